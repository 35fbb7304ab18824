"""``allreduce``: any algorithm over any pytree, through flat buckets so one collective serves many leaves."""
from __future__ import annotations

import difflib
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jdist._checks import check_choice, check_positive_int
from jdist._types import PyTree
from jdist.collectives._algorithms import ALGORITHMS, Axis, axis_size
from jdist.errors import OptionError

DEFAULT_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket


def check_algorithm(algorithm: str, axis: Axis | None = None) -> None:
  """Raises an ``OptionError`` for an unknown algorithm or one that cannot run over ``axis``."""
  if algorithm not in ALGORITHMS:
    hint = difflib.get_close_matches(str(algorithm), list(ALGORITHMS), n=1)
    raise OptionError("algorithm", algorithm, f"one of {sorted(ALGORITHMS)}",
                      f"Did you mean {hint[0]!r}?" if hint else "")
  axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
  if algorithm == "hierarchical" and axis is not None and len(axes) != 2:
    raise OptionError("axis", axis, "two mesh axes (outer, inner) for algorithm='hierarchical'",
                      "Use a 2-D mesh, e.g. jdist.make_mesh(node=2, device=4), with axis=('node', 'device') (in a "
                      "config: mesh.node=2, mesh.device=4, strategy.axis=[\"node\", \"device\"]).")


def _buckets(leaves: list[jax.Array], bucket_bytes: int) -> list[list[int]]:
  """Groups leaf indices into buckets of one dtype and at most ``bucket_bytes`` (a bigger leaf: alone)."""
  buckets: list[list[int]] = []
  open_bucket: dict[jnp.dtype, tuple[list[int], int]] = {}
  for i, leaf in enumerate(leaves):
    size = leaf.size * leaf.dtype.itemsize
    members, used = open_bucket.get(leaf.dtype, ([], 0))
    if members and used + size > bucket_bytes:
      buckets.append(members)
      members, used = [], 0
    members.append(i)
    open_bucket[leaf.dtype] = (members, used + size)
  buckets.extend(m for m, _ in open_bucket.values() if m)
  return buckets


def allreduce(tree: PyTree, axis_name: Axis, *, algorithm: str = "psum",
              op: Literal["sum", "mean"] = "sum", bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> PyTree:
  """Sums (or averages) every leaf of ``tree`` over ``axis_name``; call inside ``jax.shard_map``.

  Leaves are raveled and concatenated into buckets (one dtype each, up to ``bucket_bytes``); each
  bucket is padded to a multiple of the axis size, reduced with ``algorithm`` and split back.

  Args:
    tree: any pytree of arrays (this device's values).
    axis_name: the mesh axis (or tuple of axes; ``hierarchical`` takes exactly ``(outer, inner)``).
    algorithm: a key of ``ALGORITHMS``: ``psum``, ``ring``, ``halving_doubling``, ``tree``, ``hierarchical``.
    op: ``"sum"`` or ``"mean"`` (floating payloads only).
    bucket_bytes: the largest bucket, in bytes (> 0).

  Returns:
    A tree like ``tree`` holding the reduction, identical on every device; bool leaves come back as int32
    counts, as from ``psum``.

  Example:
    >>> f = jax.shard_map(lambda x: allreduce(x, "data", algorithm="ring"), mesh=mesh,
    ...                   in_specs=P("data"), out_specs=P("data"))  # doctest: +SKIP
  """
  check_algorithm(algorithm, axis_name)
  check_choice(op, "op", ("sum", "mean"))
  check_positive_int(bucket_bytes, "bucket_bytes")
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  n = axis_size(axis_name)
  if op == "mean":
    bad = [l.dtype for l in leaves if not jnp.issubdtype(l.dtype, jnp.inexact)]
    if bad:
      raise TypeError(f"op='mean' needs floating-point leaves, got {bad[0]}; use op='sum' for integers.")
  if algorithm == "psum":
    out = jax.lax.psum(leaves, axis_name)
  else:
    fn = ALGORITHMS[algorithm]
    # chunked algorithms split the payload into N pieces (halving-doubling: into p, the power of two <= N)
    multiple = 1 << (n.bit_length() - 1) if algorithm == "halving_doubling" else n
    out = [None] * len(leaves)
    for members in _buckets(leaves, int(bucket_bytes)):
      flat = jnp.concatenate([jnp.ravel(leaves[i]) for i in members])
      size = flat.shape[0]
      padded = math.ceil(size / multiple) * multiple
      reduced = fn(jnp.pad(flat, (0, padded - size)), axis_name)[:size]
      offset = 0
      for i in members:
        out[i] = reduced[offset:offset + leaves[i].size].reshape(leaves[i].shape)
        offset += leaves[i].size
  if op == "mean":
    out = [x / n for x in out]
  return jax.tree.unflatten(treedef, out)
