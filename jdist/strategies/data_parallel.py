"""Synchronous data parallelism: every device holds the whole model and takes the same step.

Each device computes the gradient of its shard of the global batch; a reducer (``jdist.reducers``) averages
the gradients, so every replica applies the identical update. For a loss that is a mean over examples and
an exact reducer (``mean``, any algorithm) this is exactly single-device training on the global batch
(tested to 1e-5); the compressing reducers trade that for fewer bytes.

The factory checks its arguments into a small frozen ``DataParallelConfig``; the pieces of the step are
module-level functions of it (``local_grads``, ``grads_fn``, ``init``, ``step``), each readable alone.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._types import Batch, LossFn, Params, PRNGKey
from jdist.collectives import _reducers as reducers
from jdist.collectives._reducers import Reducer, ReducerState
from jdist.errors import OptionError
from jdist.state import TrainState
from jdist.strategy import (
  StepFn,
  Strategy,
  accumulate,
  apply_update,
  metrics_from,
  raw_key,
  shard_keys,
  value_and_grad,
)

BACKENDS = ("shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class DataParallelConfig:
  """What a data-parallel step needs, checked and fixed when the strategy is built."""

  loss_fn: LossFn  # loss_fn(params, batch) -> scalar mean loss ((loss, aux) with has_aux); or a takes_key loss
  optimizer: optax.GradientTransformation
  mesh: Mesh  # parameters replicated over all of it
  axes: tuple[str, ...]  # the mesh axes the batch is split over (one or more names)
  backend: str  # "shard_map" or "pmap" (one axis holding every device)
  accumulate_steps: int  # micro-batches per device per step, >= 1
  has_aux: bool
  reducer: Reducer  # how the per-device gradients become their mean

  @property
  def n(self) -> int:
    """Devices along the data axes: the global batch must divide by ``n * accumulate_steps``."""
    return mesh_lib.axis_size(self.mesh, self.axes)

  @property
  def reduce_axis(self) -> str | tuple[str, ...]:
    """The axis name collectives take: one name, or the tuple of several."""
    return self.axes if len(self.axes) > 1 else self.axes[0]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def data_parallel(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str | tuple[str, ...] = "data",
    backend: Literal["shard_map", "pmap"] = "shard_map",
    accumulate_steps: int = 1,
    has_aux: bool = False,
    reducer: Reducer = reducers.mean(),
) -> Strategy:
  """Synchronous data-parallel SGD (any optax optimizer) over ``axis`` of ``mesh``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over the examples in ``batch``
      (``(loss, aux)`` with ``has_aux=True``; a dict ``aux`` is averaged over devices and merged into
      the metrics). ``jdist.takes_key(fn)`` for ``fn(params, batch, key)`` (dropout): device d's micro-batch j
      gets ``jdist.shard_key(state.key, state.step, d * accumulate_steps + j)``, as on one device splitting
      the global batch into the same pieces.
    optimizer: any ``optax.GradientTransformation``.
    mesh: the device mesh; parameters are replicated over all of it.
    axis: the mesh axis (or tuple of axes) the batch is split over.
    backend: ``"shard_map"`` (the core) or ``"pmap"`` (the same computation through ``jax.pmap``; one axis
      holding every device of the mesh, one process).
    accumulate_steps: split each device's batch into this many micro-batches and average their
      gradients before the one reduction (for memory); the result equals one full-batch step.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    reducer: how gradients are averaged (``jdist.reducers``): ``mean()`` (psum, the default),
      ``mean("ring" | "halving_doubling" | "tree" | "hierarchical", bucket_bytes=...)``, ``bf16(inner)``,
      ``int8()``, ``powersgd(rank, stacked=..., inner=...)`` or your own ``Reducer``. Its state is
      ``state.extra["reducer"]``: a ``ReducerState`` whose ``per_device`` part (error-feedback residuals) has
      a leading axis of one row per device, split over ``axis``, and whose ``shared`` part is replicated.
      The reported loss and aux are exact means whatever the reducer.

  Returns:
    A ``Strategy``: ``init(params, *, key=None)``, ``shard_batch(host_batch)``,
    ``step(state, batch) -> (state, metrics)`` with metrics ``loss`` (global mean), ``grad_norm``
    (of the averaged gradient) and ``step`` (updates applied, after this one). ``info``: ``axis``,
    ``devices``, ``backend``, ``reducer`` (its name) and ``accumulate_steps``. The reducer's key is split
    off ``key`` at ``init``.

  Raises:
    ValueError: (``OptionError``, ``AxisError``, ``IdleAxesError``) an axis not in the mesh, an unknown
      backend, a bad ``accumulate_steps``, a reducer that cannot run over ``axis``, ``backend="pmap"`` on
      several processes or axes.
    BatchError: at the first step, a global batch not divisible by (devices on ``axis``) x
      ``accumulate_steps``, or batch leaves with different leading sizes.
    TypeError: (``OptionTypeError``) a ``loss_fn`` or optimizer of the wrong kind, or a loss that does not
      return a scalar.

  Example:
    >>> mesh = jdist.make_mesh(data=-1)
    >>> strategy = jdist.data_parallel(loss_fn, optax.sgd(0.1), mesh)  # doctest: +SKIP
    >>> state = strategy.init(params)                                   # doctest: +SKIP
    >>> state, metrics = strategy.step(state, strategy.shard_batch(batch))  # doctest: +SKIP
  """
  cfg = make_config(loss_fn, optimizer, mesh, axis=axis, backend=backend, accumulate_steps=accumulate_steps,
                    has_aux=has_aux, reducer=reducer)
  step = StepFn(functools.partial(step_fn, cfg, grads_fn(cfg)), mesh, donate_argnums=0,
                out_shardings=(state_shardings(cfg), cfg.replicated))
  tags = [t for t in (backend if backend != "shard_map" else None, cfg.reducer.name) if t and t != "psum"]
  info = {"axis": cfg.reduce_axis, "devices": cfg.n, "backend": backend, "reducer": cfg.reducer.name,
          "accumulate_steps": cfg.accumulate_steps}
  return Strategy(init=functools.partial(init, cfg), shard_batch=functools.partial(shard_batch, cfg), step=step,
                  name="data_parallel" + (f"[{','.join(tags)}]" if tags else ""), mesh=mesh,
                  info=types.MappingProxyType(info))


def make_config(loss_fn, optimizer, mesh, *, axis, backend, accumulate_steps, has_aux, reducer) -> DataParallelConfig:
  """``data_parallel``'s arguments, checked (every check before anything compiles)."""
  checks.check_callable(loss_fn, "loss_fn")
  checks.check_optimizer(optimizer)
  axes = checks.check_axes(mesh, axis, what="data axis")
  checks.check_choice(backend, "backend", BACKENDS)
  k = checks.check_positive_int(accumulate_steps, "accumulate_steps")
  reducer = reducers.check_reducer(reducer)
  reducer.check(axes if len(axes) > 1 else axes[0])
  if backend == "pmap":
    _check_pmap(mesh, axes)
  checks.check_no_idle_axes(mesh, axes, who="data_parallel", fix="To split the batch over it too, name it in "
                            "axis (a tuple of axes)")
  return DataParallelConfig(loss_fn=loss_fn, optimizer=optimizer, mesh=mesh, axes=axes, backend=backend,
                            accumulate_steps=k, has_aux=has_aux, reducer=reducer)


def _check_pmap(mesh: Mesh, axes: tuple[str, ...]) -> None:
  if jax.process_count() > 1:
    raise OptionError("backend", "pmap", f"'shard_map' across {jax.process_count()} processes",
                      "Use backend='shard_map' (the default): jax.pmap traced inside the jitted step maps over this "
                      "process's devices only, where shard_map computes the same numbers over every process's.")
  if len(axes) != 1 or mesh_lib.axis_size(mesh, axes) != mesh.size:
    raise OptionError("axis", axes if len(axes) > 1 else axes[0],
                      f"one axis holding all {mesh.size} devices of the mesh {dict(mesh.shape)} for backend='pmap'",
                      f"Use a 1-D mesh, e.g. jdist.make_mesh({axes[0]}={mesh.size}), or backend='shard_map'.")


def local_grads(cfg: DataParallelConfig, params: Params, batch: Batch, rstate: ReducerState, key_data: jax.Array,
                step: jax.Array):
  """One device's work: its gradient, averaged over the data axis by the reducer.

  params: replicated; batch: [B/N, ...] this device's; rstate: this device's reducer state (``per_device``
  without its leading axis); key_data, step: the state's (replicated). Returns ``((loss, aux, mean_grads),
  rstate)``, the first three the same on every device.
  """
  # Mark params device-varying first: grad w.r.t. an invariant input comes back already psum'ed
  # over the axis (docs/pitfalls.md, pitfall 1), and the mean below would then be N times too big.
  params = jax.lax.pcast(params, cfg.axes, to="varying")
  vg = value_and_grad(cfg.loss_fn, has_aux=cfg.has_aux)
  k = cfg.accumulate_steps
  # a takes_key loss: this device's micro-batches are pieces d k .. d k + k - 1 of the global batch
  keys = shard_keys(cfg.loss_fn, key_data, step, jax.lax.axis_index(cfg.reduce_axis) * k, k)
  loss, aux, grads = accumulate(vg, params, batch, k, keys)
  # the reported loss and aux are exact whatever the reducer (with psum XLA fuses this into the gradients' one)
  loss, aux = jax.lax.pmean((loss, aux), cfg.reduce_axis)
  grads, rstate = cfg.reducer.reduce(grads, rstate, cfg.reduce_axis)
  return (loss, aux, grads), rstate


GradsFn = Callable[[Params, Batch, ReducerState, jax.Array, jax.Array], tuple[tuple, ReducerState]]


def grads_fn(cfg: DataParallelConfig) -> GradsFn:
  """``(params, batch, stored reducer state, key data, step) -> ((loss, aux, mean_grads), reducer state)`` over the
  global batch, through ``cfg.backend``."""
  if cfg.backend == "pmap":
    return _pmapped_grads(cfg)
  if cfg.n == 1 and cfg.reducer.exact:
    # one device on the data axis: nothing to average. Without a shard_map boundary XLA fuses the
    # gradient's consumers (bf16 -> fp32 casts, the norm, the optimizer) as in a plain jitted step.
    vg = value_and_grad(cfg.loss_fn, has_aux=cfg.has_aux)
    k = cfg.accumulate_steps
    return lambda params, batch, rstate, key_data, step: (
        accumulate(vg, params, batch, k, shard_keys(cfg.loss_fn, key_data, step, 0, k)), rstate)

  def body(params, batch, rstate, key_data, step):  # per_device leaves of rstate: [1, ...] on this device
    out, rstate = local_grads(cfg, params, batch, reducers.local_view(rstate), key_data, step)
    return out, reducers.stored_view(rstate)

  # A reducer may assemble its result from ppermute or all-to-all: equal on every device by construction, which
  # the varying-axes types cannot see, so no check_vma (for psum the compiled program is the same either way).
  rspec = ReducerState(per_device=P(cfg.axes), shared=P())
  return jax.shard_map(body, mesh=cfg.mesh, in_specs=(P(), P(cfg.axes), rspec, P(), P()), out_specs=(P(), rspec),
                       check_vma=False)


def _pmapped_grads(cfg: DataParallelConfig) -> GradsFn:
  """``grads_fn`` through ``jax.pmap`` over the one data axis."""
  n = cfg.n
  # One grouped argument, its in_axes a 1-tuple holding the structure: jax.pmap (JAX 0.10) reads a flat in_axes
  # tuple as one entry per *leaf* whenever the number of arguments equals the number of leaves, which
  # (params, batch, state) can meet by chance (empty states count 0 leaves), and then maps the wrong leaves
  # silently (issue 18). A tuple whose one entry is itself a tuple never takes that path.
  rstate_axes = ReducerState(per_device=0, shared=None)
  pmapped = jax.pmap(lambda args: local_grads(cfg, *args), axis_name=cfg.axes[0],
                     in_axes=((None, 0, rstate_axes, None, None),), out_axes=(None, rstate_axes),
                     devices=list(cfg.mesh.devices.flat))

  def grads(params, batch, rstate, key_data, step):
    # batch: [B, ...] -> [N, B/N, ...], the leading axis mapped over devices; rstate.per_device: [N, ...] already
    split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return pmapped((params, jax.tree.map(split, batch), rstate, key_data, step))

  return grads


def state_shardings(cfg: DataParallelConfig) -> TrainState:
  """Where the step leaves the state: everything replicated but the reducer's per-device rows."""
  rep = cfg.replicated
  return TrainState(step=rep, params=rep, opt_state=rep, key=rep,
                    extra={"reducer": reducers.state_shardings(cfg.mesh, cfg.axes)})


def init(cfg: DataParallelConfig, params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
  """Replicated params and optimizer state; the reducer's state from a key split off ``key``."""
  params = mesh_lib.replicate(checks.check_params(params), cfg.mesh)
  opt_state = jax.jit(cfg.optimizer.init, out_shardings=cfg.replicated)(params)
  key, reducer_key = jax.random.split(raw_key(key))
  rstate = reducers.init_state(cfg.reducer, params, reducer_key, cfg.mesh, cfg.axes)
  step, key = mesh_lib.replicate((jnp.zeros((), jnp.int32), key), cfg.mesh)
  return TrainState(step=step, params=params, opt_state=opt_state, key=key, extra={"reducer": rstate})


def shard_batch(cfg: DataParallelConfig, batch: Batch) -> Batch:
  """One process: the global batch split over the data axes; several: this process's share
  (``jdist.batches.put_batch``)."""
  return batch_lib.put_batch(batch, NamedSharding(cfg.mesh, P(cfg.axes)), multiple_of=cfg.n * cfg.accumulate_steps)


def step_fn(cfg: DataParallelConfig, grads: GradsFn, state: TrainState, batch: Batch):
  """One update: the mean gradient of the global batch (``grads``), then the shared step ending."""
  batch_lib.batch_size(batch, multiple_of=cfg.n * cfg.accumulate_steps)  # runs at trace time only
  (loss, aux, mean_grads), rstate = grads(state.params, batch, state.extra["reducer"], state.key, state.step)
  state = apply_update(state, mean_grads, loss, cfg.optimizer, extra={"reducer": rstate})
  return state, metrics_from(loss, mean_grads, aux, state.step)
