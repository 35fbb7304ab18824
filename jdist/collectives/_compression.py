"""Gradient compression for the AllReduce: bf16 on the wire, or int8 with error feedback.

``int8`` quantises ``g + residual`` with one scale shared by all devices (a max all-reduce of a scalar),
keeps what the quantisation lost as the next residual (error feedback: sent + residual = gradient +
previous residual, exactly), and sums the int8 values exactly: an all-to-all of int8 chunks
(reduce-scatter), an integer sum, and an all-gather of the int16 chunk sums. Per device it sends
(N-1)/N n/4 + (N-1)/N n/2 bytes for an fp32 payload of n bytes: 2.7x less than a ring in fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jdist._types import PyTree
from jdist.collectives._algorithms import Axis, axis_size
from jdist.collectives._allreduce import allreduce

COMPRESSIONS = (None, "bf16", "int8")


def check_compression(compression) -> None:
  if compression not in COMPRESSIONS:
    raise ValueError(f"Unknown compression: {compression!r}. It needs to be one of {list(COMPRESSIONS)}.")


def bf16_allreduce(tree: PyTree, axis: Axis, *, algorithm: str = "psum", op: str = "mean", **kwargs) -> PyTree:
  """All-reduce with floating leaves sent (and summed) in bf16, returned in their own dtype."""
  dtypes = jax.tree.map(lambda x: x.dtype, tree)
  low = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  out = allreduce(low, axis, algorithm=algorithm, op=op, **kwargs)
  return jax.tree.map(lambda x, d: x.astype(d), out, dtypes)


def int8_quantize(x: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array]:
  """(q: int8[n], scale) with one scale for all devices: max |x| over the axis maps to 127."""
  scale = jax.lax.pmax(jnp.max(jnp.abs(x)), axis) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def int8_sum(q: jax.Array, axis: Axis) -> jax.Array:
  """Exact sum over ``axis`` of int8[n] (n divisible by N): int8 all-to-all, integer add, int16 all-gather."""
  n = axis_size(axis)
  wide = jnp.int16 if 127 * n < 2**15 else jnp.int32
  chunks = q.reshape(n, -1)  # int8[N, n/N]
  received = jax.lax.all_to_all(chunks, axis, split_axis=0, concat_axis=0, tiled=True)  # chunk i from everyone
  partial = jnp.sum(received.reshape(n, -1).astype(jnp.int32), axis=0).astype(wide)
  return jax.lax.all_gather(partial, axis, tiled=True).astype(jnp.int32)


def int8_allreduce(tree: PyTree, residual: PyTree, axis: Axis, *, op: str = "mean") -> tuple[PyTree, PyTree]:
  """All-reduce of float leaves compressed to int8 with error feedback.

  Args:
    tree: this device's values (e.g. its gradient).
    residual: what earlier quantisations lost on this device (zeros at the start), like ``tree``.
    op: "sum" or "mean".

  Returns:
    ``(reduced, new_residual)``; ``sent + new_residual == tree + residual`` where ``sent`` is this
    device's dequantised contribution.
  """
  n = axis_size(axis)
  leaves, treedef = jax.tree.flatten(tree)
  res_leaves = jax.tree.leaves(residual)
  flat = jnp.concatenate([jnp.ravel(g + r).astype(jnp.float32) for g, r in zip(leaves, res_leaves)])
  size = flat.shape[0]
  padded = -(-size // n) * n
  flat = jnp.pad(flat, (0, padded - size))
  q, scale = int8_quantize(flat, axis)
  sent = q.astype(jnp.float32) * scale
  total = int8_sum(q, axis).astype(jnp.float32) * scale
  if op == "mean":
    total = total / n
  out, new_res, offset = [], [], 0
  for leaf in leaves:
    k = leaf.size
    out.append(total[offset:offset + k].reshape(leaf.shape).astype(leaf.dtype))
    new_res.append((flat[offset:offset + k] - sent[offset:offset + k]).reshape(leaf.shape).astype(leaf.dtype))
    offset += k
  return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new_res)
