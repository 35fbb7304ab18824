"""Gradient compression for the AllReduce: bf16 on the wire, int8 with error feedback, or PowerSGD.

``int8`` quantises ``g + residual`` with one scale shared by all devices (a max all-reduce of a scalar),
keeps what the quantisation lost as the next residual (error feedback: sent + residual = gradient +
previous residual, exactly), and sums the int8 values exactly: an all-to-all of int8 chunks
(reduce-scatter), an integer sum, and an all-gather of the int16 chunk sums. Per device it sends
(N-1)/N n/4 + (N-1)/N n/2 bytes for an fp32 payload of n bytes: 2.7x less than a ring in fp32.

``powersgd`` (Vogels et al. 2019, PyTorch DDP's powerSGD hook) sends a rank-r factorisation of each gradient
matrix, two thin all-reduces (P, then Q) in place of one of the matrix, with error feedback and Q kept
from step to step (warm start): r(m + n) numbers per m x n matrix instead of mn.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdist._checks import check_choice
from jdist._types import PyTree
from jdist.collectives._algorithms import Axis, axis_size
from jdist.collectives._allreduce import DEFAULT_BUCKET_BYTES, allreduce

def bf16_cast(tree: PyTree) -> PyTree:
  """``tree`` with its floating leaves in bfloat16 (the others as they are)."""
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def bf16_allreduce(tree: PyTree, axis: Axis, *, algorithm: str = "psum", op: str = "mean", **kwargs) -> PyTree:
  """All-reduce with floating leaves sent (and summed) in bf16, returned in their own dtype."""
  out = allreduce(bf16_cast(tree), axis, algorithm=algorithm, op=op, **kwargs)
  return jax.tree.map(lambda x, g: x.astype(g.dtype), out, tree)


def int8_quantize(x: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array]:
  """(q: int8[n], scale) with one scale for all devices: max |x| over the axis maps to 127.

  A NaN or infinity in any device's ``x`` makes the shared scale infinite (and every q 0): a max
  all-reduce may drop a NaN, and a NaN cast to int8 is 0, so without this flag a non-finite value would
  vanish from the sum. The flag rides on the max all-reduce the scale needs anyway.
  """
  amax = jnp.where(jnp.all(jnp.isfinite(x)), jnp.max(jnp.abs(x)), jnp.inf)
  scale = jax.lax.pmax(amax, axis) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  q = jnp.where(jnp.isfinite(scale), jnp.round(x / scale), 0.0)
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def int8_sum(q: jax.Array, axis: Axis) -> jax.Array:
  """Exact sum over ``axis`` of int8[n] (n divisible by N): int8 all-to-all, integer add, int16 all-gather."""
  n = axis_size(axis)
  wide = jnp.int16 if 127 * n < 2**15 else jnp.int32
  chunks = q.reshape(n, -1)  # int8[N, n/N]
  received = jax.lax.all_to_all(chunks, axis, split_axis=0, concat_axis=0, tiled=True)  # chunk i from everyone
  partial = jnp.sum(received.reshape(n, -1).astype(jnp.int32), axis=0).astype(wide)
  return jax.lax.all_gather(partial, axis, tiled=True).astype(jnp.int32)


def _like_tree(treedef, leaves: list, other: PyTree, what: str) -> list:
  """``other``'s leaves, checked to have ``treedef``'s structure and the shapes of ``leaves``."""
  try:
    others = treedef.flatten_up_to(other)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what} must have the structure of the values it goes with ({treedef}); {e}") from None
  for i, (leaf, o) in enumerate(zip(leaves, others)):
    if np.shape(o) != np.shape(leaf):
      raise ValueError(f"{what} leaf {i} has shape {np.shape(o)}, its value {np.shape(leaf)}; give it the same "
                       f"shape (zeros at the start).")
  return others


def int8_allreduce(tree: PyTree, residual: PyTree, axis: Axis, *, op: str = "mean") -> tuple[PyTree, PyTree]:
  """All-reduce of float leaves compressed to int8 with error feedback.

  Args:
    tree: this device's values (e.g. its gradient).
    residual: what earlier quantisations lost on this device (zeros at the start): the structure and
      shapes of ``tree``, in float32 (or wider) whatever ``tree``'s dtype: a bf16 residual would round
      away the small values it exists to keep, and their coordinates would never be sent.
    axis: the mesh axis (or axes) to reduce over; call inside ``jax.shard_map``.
    op: "sum" or "mean".

  Returns:
    ``(reduced, new_residual)``; ``sent + new_residual == tree + residual`` where ``sent`` is this
    device's dequantised contribution (``new_residual`` keeps ``residual``'s dtypes). A tree without
    elements reduces to itself. A NaN or infinity in any device's ``tree + residual`` makes ``reduced``
    and every device's ``new_residual`` all NaN.

  Raises:
    ValueError: an unknown ``op``, or a ``residual`` not shaped like ``tree``.
  """
  check_choice(op, "op", ("sum", "mean"))
  n = axis_size(axis)
  leaves, treedef = jax.tree.flatten(tree)
  res_leaves = _like_tree(treedef, leaves, residual, "residual")
  if sum(leaf.size for leaf in leaves) == 0:  # nothing to send (and no max to take)
    return tree, residual
  flat = jnp.concatenate([jnp.ravel(g.astype(jnp.float32) + r.astype(jnp.float32)) for g, r in zip(leaves, res_leaves)])
  size = flat.shape[0]
  padded = -(-size // n) * n
  flat = jnp.pad(flat, (0, padded - size))
  q, scale = int8_quantize(flat, axis)
  sent = q.astype(jnp.float32) * scale
  total = int8_sum(q, axis).astype(jnp.float32) * scale
  if op == "mean":
    total = total / n
  # A NaN or infinity on some device made the scale infinite: the result is NaN everywhere (psum's is NaN or
  # infinite where the bad value was), never a finite sum that silently lost it, so NanGuard stops training.
  # The residual turns NaN too, so later steps stay NaN rather than finite without that device's value (a
  # reset would hide the failure; the parameters are NaN after this update anyway).
  finite = jnp.isfinite(scale)
  total = jnp.where(finite, total, jnp.nan)
  sent = jnp.where(finite, sent, jnp.nan)
  out, new_res, offset = [], [], 0
  for leaf, r in zip(leaves, res_leaves):
    k = leaf.size
    out.append(total[offset:offset + k].reshape(leaf.shape).astype(leaf.dtype))
    new_res.append((flat[offset:offset + k] - sent[offset:offset + k]).reshape(leaf.shape).astype(r.dtype))
    offset += k
  return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new_res)


def _as_matrices(shape: tuple[int, ...], stacked: bool) -> tuple[int, int, int]:
  """A leaf of ``shape`` seen as ``b`` matrices [m, n]: [shape[0], prod(shape[1:])] (b = 1), or with
  ``stacked`` (a leading axis of stacked layers) one [shape[1], prod(shape[2:])] per layer (b = shape[0])."""
  if stacked:
    return shape[0], shape[1], math.prod(shape[2:])
  return 1, shape[0], math.prod(shape[1:])


def powersgd_compressible(shape: tuple[int, ...], rank: int, *, stacked: bool = False) -> bool:
  """Whether PowerSGD compresses a leaf of ``shape`` at ``rank``.

  True for a matrix (ndim >= 2, seen as [shape[0], prod(shape[1:])] = [m, n]) whose factors are fewer
  numbers than its entries, r(m + n) < mn (so r < min(m, n)); vectors and tiny matrices are all-reduced
  exactly, as PyTorch does. With ``stacked`` the leading axis stacks layers (``jax.lax.scan`` models such as
  ``jdist.models.gpt``): each layer's slice is judged, and compressed, on its own.
  """
  if len(shape) < 2 + stacked:
    return False
  _, m, n = _as_matrices(shape, stacked)
  return rank * (m + n) < m * n


def powersgd_init(params: PyTree, rank: int, *, key: jax.Array, stacked: PyTree | None = None) -> PyTree:
  """The initial Q of every leaf PowerSGD compresses (``powersgd_compressible``), None for the others.

  Args:
    params: a pytree of arrays (or shapes) like the gradients.
    rank: the rank r of the approximation, a positive int.
    key: a JAX PRNG key; the same key gives the same Q on every device.
    stacked: None, or a tree of bools like ``params``: True where the leading axis stacks layers.

  Returns:
    A tree like ``params`` holding ``Q: f32[n, r]`` (standard normal; ``f32[L, n, r]``, one per layer,
    where stacked) where the leaf is compressed and ``None`` where it is all-reduced exactly.
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = [False] * len(leaves) if stacked is None else treedef.flatten_up_to(stacked)
  shapes = []
  for x, st in zip(leaves, flags):
    b, _, n = _as_matrices(x.shape, st) if powersgd_compressible(x.shape, rank, stacked=st) else (0, 0, 0)
    shapes.append(None if not b else ((b, n, rank) if st else (n, rank)))
  flat = jax.random.normal(key, (sum(math.prod(s) for s in shapes if s),), jnp.float32)  # one draw: fast to compile
  qs, offset = [], 0
  for s in shapes:
    qs.append(None if s is None else flat[offset:offset + math.prod(s)].reshape(s))
    offset += math.prod(s) if s else 0
  return jax.tree.unflatten(treedef, qs)


def _check_qs(leaves: list, q_leaves: list) -> None:
  for i, (g, q) in enumerate(zip(leaves, q_leaves)):
    if q is None:
      continue
    stacked = q.ndim == 3
    if g.ndim < 2 + stacked:
      raise ValueError(f"PowerSGD: leaf {i} has shape {g.shape}, but only matrices (ndim >= 2, >= 3 with a "
                       f"stacked-layers axis) are compressed; give it Q = None (jdist.collectives.powersgd_init "
                       f"does).")
    b, m, n = _as_matrices(g.shape, stacked)
    want = f"({b}, {n}, r)" if stacked else f"({n}, r)"
    if q.ndim not in (2, 3) or q.shape[:-1] != ((b, n) if stacked else (n,)) or not 1 <= q.shape[-1] <= min(m, n):
      raise ValueError(f"PowerSGD: leaf {i} of shape {g.shape} ({'%d x ' % b if stacked else ''}a {m} x {n} "
                       f"matrix) needs Q of shape {want} with 1 <= r <= {min(m, n)}, got {tuple(q.shape)}.")


def powersgd_allreduce(tree: PyTree, residual: PyTree, qs: PyTree, axis: Axis, *, algorithm: str = "psum",
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> tuple[PyTree, PyTree, PyTree]:
  """Mean over ``axis`` of ``tree`` with each matrix replaced by a rank-r approximation (PowerSGD).

  For a leaf with a Q (an m x n matrix M = g + residual on this device, Q: f32[n, r]):
  ``P = mean(M Q)`` (all-reduce), ``P`` orthonormalised (QR; identical on every device),
  ``Q' = mean(M^T P)`` (all-reduce), approximation ``P Q'^T`` (of the mean of M), and
  ``new_residual = M - P Q'^T`` (error feedback against the shared approximation, as PyTorch and the
  paper's code do: a device also keeps its own distance from the mean, which cancels over the devices,
  so only the mean residual is ever applied). Leaves whose Q is None are all-reduced exactly, in
  the same collective as the Ps. One device sends r(m + n) numbers (f32) per compressed matrix
  instead of mn, through ``algorithm`` (a ring: 2(N-1)/N of that).

  Args:
    tree: this device's values (e.g. its gradient).
    residual: what earlier approximations lost on this device (zeros at the start), like ``tree``.
    qs: a tree like ``tree`` with ``Q: f32[prod(shape[1:]), r]`` (r <= min(m, n)) where the leaf is
      compressed, ``Q: f32[L, prod(shape[2:]), r]`` where its leading axis stacks L layers (each layer's
      [shape[1], prod(shape[2:])] matrix approximated on its own), and None elsewhere, identical on every
      device: ``powersgd_init``, then the Q this function returned at the previous step (warm start).
    axis: the mesh axis (or axes) to reduce over; call inside ``jax.shard_map``.
    algorithm, bucket_bytes: how the all-reduces run (``jdist.collectives.allreduce``).

  Returns:
    ``(mean, new_residual, new_qs)``: ``mean`` identical on every device; ``mean + new_residual ==
    tree + residual`` on each device for compressed leaves (for the others ``new_residual`` is 0).

  Raises:
    ValueError: a Q on a leaf that is not a matrix, or of the wrong shape.
  """
  mean = lambda t: allreduce(t, axis, algorithm=algorithm, op="mean", bucket_bytes=bucket_bytes)
  return powersgd_reduce(tree, residual, qs, mean)


def powersgd_reduce(tree: PyTree, residual: PyTree, qs: PyTree,
                    mean: Callable[[PyTree], PyTree]) -> tuple[PyTree, PyTree, PyTree]:
  """``powersgd_allreduce`` with its two exact all-reduces done by ``mean(tree) -> tree`` (a reducer's)."""
  leaves, treedef = jax.tree.flatten(tree)
  res_leaves = _like_tree(treedef, leaves, residual, "residual")
  q_leaves = treedef.flatten_up_to(qs)
  _check_qs(leaves, q_leaves)
  ms = [g + r for g, r in zip(leaves, res_leaves)]
  comp = [i for i, q in enumerate(q_leaves) if q is not None]
  exact = [i for i, q in enumerate(q_leaves) if q is None]
  hi = jax.lax.Precision.HIGHEST
  # every compressed leaf as b matrices: M: f32[b, m, n], Q: f32[b, n, r] (b = 1 unless layers are stacked)
  as_mats = lambda x, q: x.reshape(*_as_matrices(x.shape, q.ndim == 3)).astype(jnp.float32)
  mats = [as_mats(ms[i], q_leaves[i]) for i in comp]
  batched_qs = [q_leaves[i].reshape(m.shape[0], -1, q_leaves[i].shape[-1]) for m, i in zip(mats, comp)]
  ps = [jnp.matmul(m, q, precision=hi) for m, q in zip(mats, batched_qs)]  # P = M Q: f32[b, m, r]
  # exact leaves go in their own dtype (a float32 residual must not double a bf16 leaf's bytes)
  exact_mean, ps = mean(([ms[i].astype(leaves[i].dtype) for i in exact], ps))
  # QR, not Gram-Schmidt: orthonormal columns even when P is rank-deficient (a zero gradient, say)
  ps = [jnp.linalg.qr(p)[0] for p in ps]
  new_qs = mean([jnp.matmul(m.mT, p, precision=hi) for m, p in zip(mats, ps)])  # Q' = M^T P: f32[b, n, r]
  out, new_res, q_out = [None] * len(leaves), [None] * len(leaves), [None] * len(leaves)
  # the outputs keep the leaves' dtypes, the new residuals the residuals' (the state's types never change)
  for i, g in zip(exact, exact_mean):
    out[i], new_res[i] = g.astype(leaves[i].dtype), jnp.zeros_like(res_leaves[i])
  for i, m, p, q in zip(comp, mats, ps, new_qs):
    approx = jnp.matmul(p, q.mT, precision=hi)  # f32[b, m, n], the same on every device
    out[i] = approx.reshape(leaves[i].shape).astype(leaves[i].dtype)
    new_res[i] = (m - approx).reshape(leaves[i].shape).astype(res_leaves[i].dtype)
    q_out[i] = q.reshape(q_leaves[i].shape)
  return (jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new_res),
          jax.tree.unflatten(treedef, q_out))
