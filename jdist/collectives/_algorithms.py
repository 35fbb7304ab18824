"""AllReduce algorithms written from ``ppermute``, each equal to ``jax.lax.psum``.

Every function here runs inside ``jax.shard_map`` on one device's flat payload ``x: T[n]`` and returns
the sum over ``axis`` of every device's ``x``. ``n`` must be a multiple of the axis size N for the
chunked algorithms (``allreduce`` pads for you). A tuple of axes is taken in the mesh's order, whatever
its own (``mesh_order``); device i is the i-th in that order. Costs use the alpha-beta model: a message
of b bytes costs alpha + b * beta; n is the payload in bytes.

| algorithm         | rounds          | bytes sent per device  | good for                   |
|-------------------|-----------------|------------------------|----------------------------|
| psum              | XLA's choice    | XLA's choice           | the default                |
| ring              | 2(N-1)          | 2(N-1)/N n             | large payloads (bandwidth) |
| halving_doubling  | 2 log2 N (+2)   | 2(N-1)/N n (+fold)     | large payloads, fewer hops |
| tree              | 2 ceil(log2 N)  | up to ceil(log2 N) n   | small payloads (latency)   |
| hierarchical      | ring on each    | 2(Ni-1)/Ni n + 2(No-1)/(No Ni) n | 2-D meshes (torus) |
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Axis = str | tuple[str, ...]


def axis_size(axis: Axis) -> int:
  """Static number of devices along ``axis`` (inside ``shard_map``)."""
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  return math.prod(jax.lax.axis_size(a) for a in names)


def mesh_order(axis: Axis) -> Axis:
  """``axis`` with a tuple of axes put in the order of the mesh's axes (inside ``shard_map`` or ``pmap``).

  ``jax.lax.axis_index(("device", "node"))`` numbers the devices in the tuple's order but
  ``jax.lax.ppermute`` numbers them in the mesh's order, so an algorithm mixing the two over a tuple in
  another order than the mesh's would send chunks to the wrong devices. A sum over devices does not
  depend on their order: every algorithm here indexes and permutes over the axes in the mesh's order.
  A single axis, or a tuple the current mesh does not hold (``vmap``'s axes), is returned as given.
  """
  if isinstance(axis, str):
    return axis
  axes = tuple(axis)
  names = jax.sharding.get_abstract_mesh().axis_names
  if len(set(axes)) != len(axes) or not set(axes) <= set(names):
    return axes
  return tuple(a for a in names if a in axes)


def _summable(x: jax.Array) -> jax.Array:
  """Bools as int32, as ``psum`` takes them: it counts the True values where adding bools would OR them."""
  return x.astype(jnp.int32) if x.dtype == jnp.bool_ else x


def _shift(x: jax.Array, axis: Axis, n: int, by: int = 1) -> jax.Array:
  """Device i sends x to device (i + by) mod n; returns what this device received."""
  return jax.lax.ppermute(x, axis, [(j, (j + by) % n) for j in range(n)])


def _chunk(chunks: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(chunks, index, axis=0, keepdims=False)


def _set_chunk(chunks: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(chunks, value, index, axis=0)


def psum(x: jax.Array, axis: Axis) -> jax.Array:
  """XLA's own all-reduce. Cost: whatever the backend picks (NCCL ring/tree on GPU)."""
  return jax.lax.psum(x, axis)


def ring_reduce_scatter(x: jax.Array, axis: Axis) -> jax.Array:
  """Ring reduce-scatter: x: T[n] -> T[n/N], device i ending with the sum of chunk i.

  N-1 steps; at step s device i passes its running sum of chunk (i - s - 1) mod N to device i+1, which
  adds its own copy of that chunk. Cost: (N-1) alpha + (N-1)/N n beta.
  """
  x, axis = _summable(x), mesh_order(axis)
  n = axis_size(axis)
  chunks = x.reshape(n, -1)  # T[N, n/N]
  if n == 1:
    return chunks[0]
  i = jax.lax.axis_index(axis)
  for s in range(n - 1):
    send = _chunk(chunks, (i - s - 1) % n)
    received = _shift(send, axis, n)  # from device i-1: its sum of chunk (i - s - 2) mod N
    idx = (i - s - 2) % n
    chunks = _set_chunk(chunks, idx, _chunk(chunks, idx) + received)
  return _chunk(chunks, i)


def ring_all_gather(chunk: jax.Array, axis: Axis) -> jax.Array:
  """Ring all-gather: device i holds chunk i, T[c] -> T[N c] in chunk order on every device.

  N-1 steps, each passing the newest chunk to the right. Cost: (N-1) alpha + (N-1)/N n beta.
  """
  axis = mesh_order(axis)
  n = axis_size(axis)
  if n == 1:
    return chunk
  i = jax.lax.axis_index(axis)
  chunks = jnp.zeros((n,) + chunk.shape, chunk.dtype)
  chunks = _set_chunk(chunks, i, chunk)
  current = chunk
  for s in range(n - 1):
    current = _shift(current, axis, n)  # chunk (i - s - 1) mod N
    chunks = _set_chunk(chunks, (i - s - 1) % n, current)
  return chunks.reshape(-1)


def ring(x: jax.Array, axis: Axis) -> jax.Array:
  """Bandwidth-optimal ring all-reduce: ring reduce-scatter, then ring all-gather.

  Cost: 2(N-1) alpha + 2(N-1)/N n beta, the minimum bytes any all-reduce must send per device.
  """
  return ring_all_gather(ring_reduce_scatter(x, axis), axis)


def _fold_layout(n: int) -> tuple[int, int, list[int]]:
  """Rabenseifner's fold for any N: (p, r, real device of each of the p virtual ranks).

  p is the largest power of two <= N and r = N - p. Devices 2k and 2k+1 for k < r pair up: the even one
  hands its vector to the odd one and sits out. The p that remain are renumbered 0..p-1.
  """
  p = 1 << (n.bit_length() - 1)
  r = n - p
  real = [2 * v + 1 if v < r else v + r for v in range(p)]
  return p, r, real


def halving_doubling(x: jax.Array, axis: Axis) -> jax.Array:
  """Rabenseifner all-reduce: recursive-halving reduce-scatter, recursive-doubling all-gather.

  With p = N a power of two, log2 N rounds each way; in round k partners i and i XOR d (d = N/2, N/4,
  ..., 1) swap halves of what they still own, so each sends n/2 + n/4 + ... = (N-1)/N n. For other N,
  the standard fold first adds the vectors of r = N - p device pairs (one extra round of n bytes before
  and after). Cost: 2 log2 p alpha + 2(p-1)/p n beta (+ 2 alpha + 2 n beta for the fold).
  """
  x, axis = _summable(x), mesh_order(axis)
  n = axis_size(axis)
  if n == 1:
    return x
  p, r, real = _fold_layout(n)
  i = jax.lax.axis_index(axis)
  if r:
    # fold: device 2k -> 2k+1 for k < r; the receivers now hold the pair's sum
    x = x + jax.lax.ppermute(x, axis, [(2 * k, 2 * k + 1) for k in range(r)])
  # virtual rank of this device (meaningless, and unused, on the devices that sat out)
  vrank = jnp.where(i < 2 * r, i // 2, i - r)
  buf = x.reshape(p, -1)  # T[p, n/p]: the chunks this device still owns
  d = p // 2
  while d >= 1:
    upper = (vrank // d) % 2 == 1
    half = buf.shape[0] // 2
    lower_half, upper_half = buf[:half], buf[half:]
    send = jnp.where(upper, lower_half, upper_half)
    keep = jnp.where(upper, upper_half, lower_half)
    buf = keep + jax.lax.ppermute(send, axis, [(real[v], real[v ^ d]) for v in range(p)])
    d //= 2
  d = 1
  while d < p:  # recursive doubling: undo the halving, concatenating instead of adding
    upper = (vrank // d) % 2 == 1
    received = jax.lax.ppermute(buf, axis, [(real[v], real[v ^ d]) for v in range(p)])
    buf = jnp.where(upper, jnp.concatenate([received, buf]), jnp.concatenate([buf, received]))
    d *= 2
  out = buf.reshape(-1)
  if r:
    # unfold: the odd device of each pair hands the result back to its even partner
    back = jax.lax.ppermute(out, axis, [(2 * k + 1, 2 * k) for k in range(r)])
    out = jnp.where((i < 2 * r) & (i % 2 == 0), back, out)
  return out


def tree(x: jax.Array, axis: Axis) -> jax.Array:
  """Binomial-tree reduce to device 0, then binomial-tree broadcast; works for any N.

  Round k of the reduce: device i with i mod 2^(k+1) = 2^k sends its partial sum to i - 2^k. The
  broadcast runs the rounds backwards. Each round sends the whole payload, so it suits small payloads.
  Cost: 2 ceil(log2 N) (alpha + n beta) in time; the root, the busiest sender, puts ceil(log2 N) n
  bytes on the wire (all in the broadcast).
  """
  x, axis = _summable(x), mesh_order(axis)
  n = axis_size(axis)
  if n == 1:
    return x
  i = jax.lax.axis_index(axis)
  rounds = math.ceil(math.log2(n))
  for k in range(rounds):
    d = 1 << k
    pairs = [(j, j - d) for j in range(n) if j % (2 * d) == d]
    x = x + jax.lax.ppermute(x, axis, pairs)  # devices that receive nothing get zeros
  for k in reversed(range(rounds)):
    d = 1 << k
    pairs = [(j, j + d) for j in range(n) if j % (2 * d) == 0 and j + d < n]
    received = jax.lax.ppermute(x, axis, pairs)
    x = jnp.where(i % (2 * d) == d, received, x)
  return x


def hierarchical(x: jax.Array, axis: Sequence[str]) -> jax.Array:
  """2-D all-reduce over ``axis = (outer, inner)``: reduce-scatter on inner, all-reduce on outer, all-gather on inner.

  The scheme of 2-D torus and multi-node GPU systems: the fast inner links carry the bulk, the outer
  links only 1/N_inner of the payload. Each phase is a ring. Cost: 2(Ni-1) + 2(No-1) alphas and
  2(Ni-1)/Ni n + 2(No-1)/(No Ni) n bytes per device.
  """
  if isinstance(axis, str) or len(axis) != 2:
    raise ValueError(f"hierarchical all-reduce needs two mesh axes (outer, inner), got {axis!r}. Pass e.g. "
                     f"axis_name=('node', 'device').")
  outer, inner = axis
  shard = ring_reduce_scatter(x, inner)  # T[n / Ni]
  ni, no = axis_size(inner), axis_size(outer)
  if shard.shape[0] % no:
    shard = jnp.pad(shard, (0, no - shard.shape[0] % no))
  reduced = ring(shard, outer)[: x.shape[0] // ni]
  return ring_all_gather(reduced, inner)


ALGORITHMS = {
    "psum": psum,
    "ring": ring,
    "halving_doubling": halving_doubling,
    "tree": tree,
    "hierarchical": hierarchical,
}
