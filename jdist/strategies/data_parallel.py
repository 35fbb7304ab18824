"""Synchronous data parallelism: every device holds the whole model and takes the same step.

Each device computes the gradient of its shard of the global batch; an AllReduce averages the
gradients, so every replica applies the identical update. For a loss that is a mean over examples
this is exactly single-device training on the global batch (tested to 1e-5).
"""
from __future__ import annotations

import re
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import collectives
from jdist import mesh as mesh_lib
from jdist._checks import (
  check_callable,
  check_optimizer,
  check_params,
  check_positive_int,
)
from jdist._types import Batch, LossFn, Params, PRNGKey
from jdist.collectives._compression import check_compression
from jdist.state import TrainState
from jdist.strategy import (
  StepFn,
  Strategy,
  accumulate,
  metrics_from,
  optimizer_update,
  raw_key,
  value_and_grad,
)

BACKENDS = ("shard_map", "pmap")


def data_parallel(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str | tuple[str, ...] = "data",
    backend: Literal["shard_map", "pmap"] = "shard_map",
    accumulate_steps: int = 1,
    has_aux: bool = False,
    allreduce: str = "psum",
    bucket_bytes: int = collectives.DEFAULT_BUCKET_BYTES,
    compression: str | None = None,
    powersgd_rank: int = 1,
    powersgd_stacked: Sequence[str] = (),
) -> Strategy:
  """Synchronous data-parallel SGD (any optax optimizer) over ``axis`` of ``mesh``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the examples in ``batch``
      (``(loss, aux)`` with ``has_aux=True``; a dict ``aux`` is averaged over devices and merged into
      the metrics).
    optimizer: any ``optax.GradientTransformation``.
    mesh: the device mesh; parameters are replicated over all of it.
    axis: the mesh axis (or tuple of axes) the batch is split over.
    backend: ``"shard_map"`` (the core) or ``"pmap"`` (the same computation through ``jax.pmap``).
    accumulate_steps: split each device's batch into this many micro-batches and average their
      gradients before the one AllReduce (for memory); the result equals one full-batch step.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    allreduce: how gradients are averaged, a key of ``jdist.collectives.ALGORITHMS`` (``psum``, ``ring``,
      ``halving_doubling``, ``tree``, ``hierarchical`` with ``axis=(outer, inner)``).
    bucket_bytes: with an ``allreduce`` other than ``psum``, gradients are flattened into buckets of at most
      this many bytes per collective (``psum`` leaves that to XLA and takes no ``bucket_bytes``).
    compression: ``None``; ``"bf16"`` (gradients sent and summed in bf16); ``"int8"`` (int8 with error
      feedback; the per-device residual is kept in ``state.extra["residual"]``, leading axis = devices; the
      int8 sum is an all-to-all and an all-gather of its own, so neither ``allreduce`` nor ``bucket_bytes``
      applies); or
      ``"powersgd"`` (each gradient matrix, seen as [shape[0], prod(rest)] = [m, n], replaced by a rank-r
      approximation P Q^T, with error feedback in ``state.extra["residual"]`` and Q kept replicated in
      ``state.extra["q"]`` as the next step's warm start; one device sends r(m + n) floats per matrix
      instead of mn, in two all-reduces. Vectors and matrices with r(m + n) >= mn are all-reduced exactly).
    powersgd_rank: the rank r of PowerSGD's approximation (with ``compression="powersgd"`` only).
    powersgd_stacked: regular expressions over parameter paths (``"blocks/qkv"``) of leaves whose leading
      axis stacks layers, as ``lax.scan`` models keep them (``jdist.models.gpt.STACKED``): each layer's
      matrix is approximated on its own (r(m + n) per layer, not r(L + mn/L) for the whole stack) and
      stacked vectors (per-layer norms) are sent exactly. Every expression must match a parameter.

  Returns:
    A ``Strategy``: ``init(params, *, key=None)``, ``shard_batch(host_batch)``,
    ``step(state, batch) -> (state, metrics)`` with metrics ``loss`` (global mean), ``grad_norm``
    (of the averaged gradient) and ``step`` (updates applied, after this one).

  Raises:
    ValueError / TypeError: an axis not in the mesh, an unknown backend, a bad ``accumulate_steps`` or
    ``powersgd_rank``, ``compression="int8"`` with an ``allreduce`` other than ``"psum"`` or a
    ``bucket_bytes`` other than the default.
    At the first step: a global batch not divisible by (devices on ``axis``) x ``accumulate_steps``,
    batch leaves with different leading sizes, or a ``loss_fn`` that does not return a scalar.

  Example:
    >>> mesh = jdist.make_mesh(data=-1)
    >>> strategy = jdist.data_parallel(loss_fn, optax.sgd(0.1), mesh)  # doctest: +SKIP
    >>> state = strategy.init(params)                                   # doctest: +SKIP
    >>> state, metrics = strategy.step(state, strategy.shard_batch(batch))  # doctest: +SKIP
  """
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  axes = checks.check_axes(mesh, axis, what="data axis")
  if backend not in BACKENDS:
    raise ValueError(f"Unknown backend {backend!r}. It needs to be one of {list(BACKENDS)}.")
  k = check_positive_int(accumulate_steps, "accumulate_steps")
  collectives.check_algorithm(allreduce, axes if len(axes) > 1 else axes[0])
  check_compression(compression)
  if compression == "int8" and allreduce != "psum":
    raise ValueError(f"compression='int8' sums its int8 payload with its own all-to-all and all-gather, so it "
                     f"takes no all-reduce algorithm, got allreduce={allreduce!r}. Drop allreduce=, or use "
                     f"compression='bf16' or 'powersgd', which run through it.")
  if compression == "int8" and bucket_bytes != collectives.DEFAULT_BUCKET_BYTES:
    raise ValueError(f"compression='int8' sends every gradient in one payload with one shared scale, so it takes "
                     f"no bucket_bytes, got bucket_bytes={bucket_bytes!r}. Drop bucket_bytes=.")
  if not isinstance(bucket_bytes, (int, np.integer)) or isinstance(bucket_bytes, bool) or bucket_bytes < 1:
    raise ValueError(f"bucket_bytes must be a positive int (the largest bucket, in bytes), got {bucket_bytes!r}.")
  if allreduce == "psum" and bucket_bytes != collectives.DEFAULT_BUCKET_BYTES:
    raise ValueError(f"bucket_bytes sizes the buckets of the algorithms written from ppermute (ring, "
                     f"halving_doubling, tree, hierarchical); allreduce='psum' hands every gradient to one psum, "
                     f"which XLA combines itself, so bucket_bytes={bucket_bytes!r} would change nothing. Drop "
                     f"bucket_bytes=, or pick one of those algorithms, e.g. allreduce='ring'.")
  rank = check_positive_int(powersgd_rank, "powersgd_rank")
  if rank != 1 and compression != "powersgd":
    raise ValueError(f"powersgd_rank={powersgd_rank!r} applies only with compression='powersgd', got "
                     f"compression={compression!r}. Pass compression='powersgd' or drop powersgd_rank.")
  if powersgd_stacked and compression != "powersgd":
    raise ValueError(f"powersgd_stacked applies only with compression='powersgd', got compression={compression!r}.")
  stacked_patterns = _compile_patterns(powersgd_stacked, "powersgd_stacked")
  with_residual = compression in ("int8", "powersgd")  # error feedback: a residual per device
  n = mesh_lib.axis_size(mesh, axes)
  if backend == "pmap":
    if jax.process_count() > 1:
      raise ValueError(
          f"backend='pmap' cannot run across {jax.process_count()} processes: the pmap runs inside the jitted "
          f"step, and jax.pmap traced inside jax.jit maps over this process's devices only. Use "
          f"backend='shard_map' (the default), which computes the same numbers on a mesh over every process's "
          f"devices.")
    if len(axes) != 1 or n != mesh.size:
      raise ValueError(
          f"backend='pmap' maps over one axis holding every device of the mesh, but axis {axis!r} has {n} "
          f"of the mesh's {mesh.size} devices ({dict(mesh.shape)}). Use a 1-D mesh, e.g. "
          f"jdist.make_mesh({axes[0]}={mesh.size}), or backend='shard_map'.")
  checks.check_no_idle_axes(mesh, axes, who="data_parallel", fix="To split the batch over it too, name it in "
                              "axis (a tuple of axes)")
  replicated = NamedSharding(mesh, P())
  vg = value_and_grad(loss_fn, has_aux=has_aux)

  reduce_axis = axes if len(axes) > 1 else axes[0]

  def reduce(tree, residual, q):
    # tree: this device's (loss, aux, grads); returns their mean over the data axis, identical everywhere
    if compression is None:  # one bucketed all-reduce for all three
      return (collectives.allreduce(tree, reduce_axis, algorithm=allreduce, op="mean", bucket_bytes=bucket_bytes),
              residual, q)
    # compressed: the gradients only; the reported loss and aux stay exact
    (loss, aux), grads = jax.lax.pmean(tree[:2], reduce_axis), tree[2]
    if compression == "bf16":
      grads = collectives.bf16_allreduce(grads, reduce_axis, algorithm=allreduce, bucket_bytes=bucket_bytes)
    elif compression == "int8":
      grads, residual = collectives.int8_allreduce(grads, residual, reduce_axis)
    else:
      grads, residual, q = collectives.powersgd_allreduce(grads, residual, q, reduce_axis, algorithm=allreduce,
                                                          bucket_bytes=bucket_bytes)
    return (loss, aux, grads), residual, q

  def local_grads(params, batch, residual, q):
    # params: replicated; batch: [B/N, ...] on this device; residual: [1, ...] (error feedback) or None;
    # q: PowerSGD's replicated Q tree or None.
    # Mark params device-varying first: grad w.r.t. an invariant input comes back already psum'ed
    # over the axis (docs/pitfalls.md, pitfall 1), and the mean below would then be N times too big.
    params = jax.lax.pcast(params, axes, to="varying")
    loss, aux, grads = accumulate(vg, params, batch, k)
    residual = jax.tree.map(lambda r: r[0], residual)
    out, residual, q = reduce((loss, aux, grads), residual, q)
    return out, jax.tree.map(lambda r: r[None], residual), q

  # psum results are provably replicated; results assembled from ppermute / all-to-all are equal on every
  # device by construction but the type system cannot see it, so those run with check_vma=False
  check_vma = allreduce == "psum" and compression is None
  if backend == "shard_map" and n == 1 and compression is None:
    # one device on the data axis: nothing to average. Without a shard_map boundary XLA fuses the
    # gradient's consumers (bf16 -> fp32 casts, the norm, the optimizer) as in a plain jitted step.
    def sharded_grads(params, batch, residual, q):
      return accumulate(vg, params, batch, k), residual, q
  elif backend == "shard_map":
    sharded_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(axes), P(axes), P()),
                                  out_specs=(P(), P(axes), P()), check_vma=check_vma)
  else:
    pmapped = jax.pmap(local_grads, axis_name=axes[0], in_axes=(None, 0, 0, None), out_axes=(None, 0, None),
                       devices=list(mesh.devices.flat))

    def sharded_grads(params, batch, residual, q):
      # batch: [B, ...] -> [N, B/N, ...], the leading axis mapped over devices; residual: [N, 1, ...]
      split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
      out, residual, q = pmapped(params, jax.tree.map(split, batch), jax.tree.map(split, residual), q)
      return out, jax.tree.map(lambda r: r.reshape(n, *r.shape[2:]), residual), q

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    params = mesh_lib.replicate(check_params(params), mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    extra, key = None, raw_key(key)
    if with_residual:  # one residual per device: leading axis of size N, split over the data axis
      # float32 or wider whatever the parameters' dtype: a bf16 residual would round small gradients away
      zeros = lambda p: jnp.zeros((n,) + p.shape, jnp.promote_types(p.dtype, jnp.float32))
      extra = {"residual": jax.jit(lambda p: jax.tree.map(zeros, p), out_shardings=NamedSharding(mesh, P(axes)))(params)}
    if compression == "powersgd":  # Q from a key of its own, the same on every device
      key, q_key = jax.random.split(key)
      stacked = _stacked_leaves(params, stacked_patterns)
      extra["q"] = jax.jit(lambda k: collectives.powersgd_init(params, rank, key=k, stacked=stacked),
                           out_shardings=replicated)(q_key)
    step, key = mesh_lib.replicate((jnp.zeros((), jnp.int32), key), mesh)
    return TrainState(step=step, params=params, opt_state=opt_state, key=key, extra=extra)

  def shard_batch(batch: Batch) -> Batch:
    # one process: the global batch; several: this process's share (jdist.batches.put_batch)
    return batch_lib.put_batch(batch, NamedSharding(mesh, P(axes)), multiple_of=n * k)

  def step_fn(state: TrainState, batch: Batch):
    batch_lib.batch_size(batch, multiple_of=n * k)  # runs at trace time only
    residual = state.extra["residual"] if with_residual else None
    q = state.extra["q"] if compression == "powersgd" else None
    (loss, aux, grads), residual, q = sharded_grads(state.params, batch, residual, q)
    updates, opt_state = optimizer_update(optimizer, grads, state.opt_state, state.params, loss)
    params = optax.apply_updates(state.params, updates)
    extra = None
    if with_residual:
      extra = {"residual": residual, "q": q} if compression == "powersgd" else {"residual": residual}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
    return new_state, metrics_from(loss, grads, aux, new_state.step)

  state_shardings = replicated
  if with_residual:
    extra_shardings = {"residual": NamedSharding(mesh, P(axes))}
    if compression == "powersgd":
      extra_shardings["q"] = replicated
    state_shardings = TrainState(step=replicated, params=replicated, opt_state=replicated, key=replicated,
                                 extra=extra_shardings)
  step = StepFn(step_fn, mesh, donate_argnums=0, out_shardings=(state_shardings, replicated))
  tags = [t for t in (backend if backend != "shard_map" else None, allreduce if allreduce != "psum" else None,
                      compression if compression != "powersgd" else f"powersgd-r{rank}") if t]
  name = "data_parallel" + (f"[{','.join(tags)}]" if tags else "")
  return Strategy(init=init, shard_batch=shard_batch, step=step, name=name, mesh=mesh)


def _compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise TypeError(f"{what} must be a sequence of regular expressions, got the string {patterns!r}; wrap it in "
                    f"a list: [{patterns!r}].")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise ValueError(f"{what}: {pattern!r} is not a regular expression ({e}).") from None
  return compiled


def _stacked_leaves(params: Params, patterns: list[re.Pattern]) -> Params:
  """A tree of bools like ``params``: True where a pattern matches the leaf's path ("blocks/qkv")."""
  from jdist.strategies.model_parallel import path_str

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(path) for path, _ in flat]
  for pattern in patterns:
    if not any(pattern.search(p) for p in paths):
      raise ValueError(f"powersgd_stacked: {pattern.pattern!r} matches no parameter. The parameter paths are: "
                       f"{', '.join(paths)}.")
  return jax.tree.unflatten(treedef, [any(pt.search(p) for pt in patterns) for p in paths])
