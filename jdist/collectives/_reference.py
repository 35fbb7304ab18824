"""numpy references: the same AllReduce algorithms, simulated on a list of per-device arrays.

Each function takes ``xs`` (one flat array per device) and returns the list of what every device
holds at the end, so tests can compare the JAX versions against an independent simulation. The
ring references also return a trace of every step (used by examples/allreduce_walkthrough.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _padded(xs: Sequence[np.ndarray], multiple: int) -> tuple[list[np.ndarray], int]:
  """The flat arrays zero-padded to a length divisible by ``multiple`` (as the JAX versions pad each bucket),
  and their length before.

  Raises:
    ValueError: no arrays, or arrays of different sizes.
  """
  flat = [np.ravel(np.asarray(x)) for x in xs]
  sizes = {x.size for x in flat}
  if len(sizes) != 1:
    raise ValueError(f"An all-reduce needs one array of the same size per device, got sizes {sorted(sizes)} "
                     f"for {len(flat)} devices." if flat else "An all-reduce needs one array per device, got none.")
  size = sizes.pop()
  padded = math.ceil(size / multiple) * multiple
  return [np.pad(x, (0, padded - size)) for x in flat], size


def psum_reference(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
  total = np.sum(np.stack(xs), axis=0)
  return [total.copy() for _ in xs]


def ring_reference(xs: Sequence[np.ndarray], *, trace: bool = False):
  """Ring reduce-scatter then all-gather. Returns results, and with ``trace`` a list of
  (phase, step, [chunks of every device]) after each step (arrays zero-padded to N equal chunks)."""
  n = len(xs)
  xs, size = _padded(xs, n)
  chunks = [x.reshape(n, -1).copy() for x in xs]
  steps = []
  for s in range(n - 1):  # reduce-scatter
    sends = [chunks[i][(i - s - 1) % n].copy() for i in range(n)]
    for i in range(n):
      chunks[i][(i - s - 2) % n] += sends[(i - 1) % n]
    if trace:
      steps.append(("reduce-scatter", s + 1, [c.copy() for c in chunks]))
  for s in range(n - 1):  # all-gather: device i owns the full sum of chunk i
    sends = [chunks[i][(i - s) % n].copy() for i in range(n)]
    for i in range(n):
      chunks[i][(i - s - 1) % n] = sends[(i - 1) % n]
    if trace:
      steps.append(("all-gather", s + 1, [c.copy() for c in chunks]))
  results = [c.reshape(-1)[:size] for c in chunks]
  return (results, steps) if trace else results


def halving_doubling_reference(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Rabenseifner with the fold for non-power-of-two N, as message exchanges between devices."""
  n = len(xs)
  p = 1 << (n.bit_length() - 1)
  r = n - p
  xs, size = _padded(xs, p)
  for k in range(r):
    xs[2 * k + 1] = xs[2 * k + 1] + xs[2 * k]
  real = [2 * v + 1 if v < r else v + r for v in range(p)]
  # each virtual rank owns a contiguous range [lo, hi) of the p chunks
  bufs = {v: xs[real[v]].reshape(p, -1).copy() for v in range(p)}
  owned = {v: (0, p) for v in range(p)}
  d = p // 2
  while d >= 1:
    new_bufs, new_owned = {}, {}
    for v in range(p):
      lo, hi = owned[v]
      mid = (lo + hi) // 2
      keep = (mid, hi) if (v // d) % 2 else (lo, mid)
      partner = v ^ d
      plo, _ = owned[partner]
      new_bufs[v] = bufs[v][keep[0] - lo:keep[1] - lo] + bufs[partner][keep[0] - plo:keep[1] - plo]
      new_owned[v] = keep
    bufs, owned = new_bufs, new_owned
    d //= 2
  full = np.concatenate([bufs[v] for v in sorted(range(p), key=lambda v: owned[v][0])]).reshape(-1)[:size]
  out = [None] * n
  for v in range(p):
    out[real[v]] = full.copy()
  for k in range(r):
    out[2 * k] = full.copy()
  return out


def tree_reference(xs: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Binomial-tree reduce to device 0, then broadcast back down the same tree."""
  n = len(xs)
  xs = [np.array(x, copy=True) for x in xs]
  rounds = math.ceil(math.log2(n)) if n > 1 else 0
  for k in range(rounds):
    d = 1 << k
    for j in range(n):
      if j % (2 * d) == d:
        xs[j - d] = xs[j - d] + xs[j]
  for k in reversed(range(rounds)):
    d = 1 << k
    for j in range(n):
      if j % (2 * d) == 0 and j + d < n:
        xs[j + d] = xs[j].copy()
  return xs


def hierarchical_reference(xs: Sequence[np.ndarray], outer: int, inner: int) -> list[np.ndarray]:
  """Devices in row-major (outer, inner) order: reduce-scatter within each inner group, all-reduce
  across outer groups, all-gather within each inner group."""
  if len(xs) != outer * inner:
    raise ValueError(f"hierarchical_reference needs outer * inner = {outer} * {inner} = {outer * inner} arrays "
                     f"(devices in row-major (outer, inner) order), got {len(xs)}.")
  xs, size = _padded(xs, inner)
  shards = {}
  for o in range(outer):
    group = [xs[o * inner + i] for i in range(inner)]
    total = np.sum(np.stack(group), axis=0).reshape(inner, -1)
    for i in range(inner):
      shards[(o, i)] = total[i]
  out = [None] * (outer * inner)
  for i in range(inner):
    reduced = np.sum(np.stack([shards[(o, i)] for o in range(outer)]), axis=0)
    for o in range(outer):
      shards[(o, i)] = reduced
  for o in range(outer):
    full = np.concatenate([shards[(o, i)] for i in range(inner)])[:size]
    for i in range(inner):
      out[o * inner + i] = full.copy()
  return out


REFERENCES = {
    "psum": psum_reference,
    "ring": ring_reference,
    "halving_doubling": halving_doubling_reference,
    "tree": tree_reference,
}
