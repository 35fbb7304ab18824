"""The ``pipeline`` factory: checks its arguments once, then wires a schedule's executor into a Strategy."""
from __future__ import annotations

import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._types import Batch, Params, PRNGKey
from jdist.errors import AxisError
from jdist.state import TrainState
from jdist.strategies.pipeline import _gpipe, _ticks
from jdist.strategies.pipeline._layout import (
  check_stages,
  param_shardings,
  param_specs,
  to_device_order,
)
from jdist.strategies.pipeline._schedules import pipeline_schedule
from jdist.strategies.pipeline._stage import PipelineConfig, batch_x, vary_params
from jdist.strategy import StepFn, Strategy, apply_update, metrics_from, sharded_state

# each schedule's executor: (config, params, batch, key base) -> (loss, aux, grads, busy ticks) on one device
EXECUTORS: dict[str, Callable] = {"gpipe": _gpipe.local_grads, "circular": _gpipe.local_grads,
                                  "1f1b": _ticks.local_grads, "interleaved_1f1b": _ticks.local_grads,
                                  "zb_h1": _ticks.local_grads, "zbv": _ticks.local_grads}
# jax.checkpoint_policies that ``remat`` may also name as a string (a TOML config cannot hold a function)
REMAT_NAMES = ("everything_saveable", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def pipeline(
    stage_fn: Callable[[Params, jax.Array], jax.Array],
    loss_fn: Callable[[Params, jax.Array, Batch], jax.Array],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str = "pipe",
    microbatches: int = 1,
    schedule: str = "gpipe",
    repeats: int | None = None,
    data_axis: str | None = None,
    input_fn: Callable[[Params, Batch], jax.Array] | None = None,
    has_aux: bool = False,
    remat: Callable[..., Any] | str | None = None,
) -> Strategy:
  """Pipeline-parallel training of a stack of identical stages.

  ``params`` (given to ``init``) must be a dict with key ``"stages"``: a pytree whose leaves all have the
  same leading size S (one slice per layer). Other keys (embeddings, heads) are replicated. The state
  keeps every leaf's shape, [S, ...], split over the pipe devices on its leading axis, so the optimizer
  sees the parameters as on one device: shape-aware optimizers (adafactor's factored moments, muon's
  matrices, masks on ``x.ndim``) train as they do there. With one stage per device (v = 1) the layers stay
  in order (device d holds the d-th block); with virtual stages they are stored device by device (each
  device's virtual stages together: round-robin, or a V for "zbv"), a permutation of the layer axis that
  ``unstack_params(params, strategy.info["schedule"])`` undoes; ``strategy.info["layer_layout"]`` names
  it, and ``jdist.fit`` (or a ``Checkpointer`` given it as ``layer_layout``) refuses to resume a checkpoint
  written with another one.

  Randomness (dropout): wrap ``stage_fn`` and / or ``loss_fn`` in ``jdist.takes_key`` and they get a key:
  ``stage_fn(layer_params, x, key)``, ``loss_fn(params, y, batch, key)``. Micro-batch i of data replica r
  (``shard`` r m + i, the micro-batches numbered in global batch order) gets
  ``k = jdist.shard_key(state.key, state.step, shard)``; the loss gets k and model layer l gets
  ``fold_in(k, l)`` (l in model order, whatever device holds it), so every schedule and mesh draws what
  the layers run in sequence on one device draw with those keys; ``input_fn`` gets none.

  Args:
    stage_fn: ``stage_fn(layer_params, x) -> x`` for ONE layer (x keeps its shape: [mb, ...]).
    loss_fn: ``loss_fn(params, y, batch) -> scalar``, the mean loss of a micro-batch from the last
      layer's output ``y``.
    optimizer: any optax optimizer.
    mesh: a mesh with ``axis`` (and ``data_axis`` if given).
    microbatches: m; each device's batch is split into m equal micro-batches.
    schedule: one of ``SCHEDULES`` (tables and bubbles: ``pipeline_schedule``): "gpipe", "circular"
      (circular GPipe, v virtual stages), "1f1b", "interleaved_1f1b" (Megatron's, v virtual stages),
      "zb_h1" (zero bubble, backward split in B and W; v virtual stages: PyTorch's interleaved ZB) or
      "zbv" (zero bubble in a V, 2 virtual stages). The last four run ``_ticks``'s hand-written backward.
    repeats: v, virtual stages per device: default 2 for "circular" and "interleaved_1f1b", 1 for "zb_h1";
      "gpipe" and "1f1b" take 1 only, "zbv" 2 only.
    data_axis: also split the batch over this axis (data x pipe meshes). Without it the batch is
      replicated over the mesh (only the first and last pipe devices read it).
    input_fn: ``input_fn(params, batch) -> x`` before the first layer (default ``batch["x"]``).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux (a pytree of scalars) is averaged over the
      micro-batches and data replicas, like the loss, and reported with the metrics.
    remat: what each layer keeps from its forward for its backward, as a ``jax.checkpoint`` policy (or
      the name of one in ``jax.checkpoint_policies``: "nothing_saveable", "dots_saveable", ...). None (the
      default): everything the backward reads that depends on the activations, and no forward runs
      twice; ``jax.checkpoint_policies.nothing_saveable``: each stage's input only, the backward reruns
      the forward (the GPipe paper's re-materialisation; what "1f1b" did before); ``dots_saveable``:
      the matmul outputs, the rest recomputed. Values computed from the weights alone are never kept
      per micro-batch. Under "gpipe" and "circular" it is the policy of each tick's ``jax.checkpoint``.

  Returns:
    A ``Strategy``. Metrics: ``loss``, ``grad_norm``, ``bubble`` (idle stage-ticks / all, counted from
    the schedule the step ran) and ``ticks`` (rows of the schedule's table: forward ticks for "gpipe" and
    "circular", every tick for the others); ``info["schedule"]`` is that ``Schedule``, ``info["config"]``
    the frozen ``PipelineConfig`` (for ``op_flops`` / ``step_flops``).
    ``shard_batch`` takes the global batch in one process and this process's share in a multi-process run
    (as ``jdist.batches.put_batch``); with ``data_axis`` outermost, e.g. ``make_mesh(data=2, pipe=4)`` on 2
    processes, each process's devices need only its share, otherwise the shares are first gathered on
    every host (``put_batch(..., gather=True)``).

  Raises:
    OptionError, OptionTypeError, AxisError, IdleAxesError: arguments that cannot make a pipeline.
  """
  checks.check_optimizer(optimizer)
  axis = checks.check_axis(mesh, axis, who="pipeline", what="pipe axis", example="pipe")
  data_axes = checks.check_axes(mesh, data_axis, what="data axis") if data_axis is not None else ()
  if axis in data_axes:
    raise AxisError(f"data_axis {data_axis!r} includes the pipe axis {axis!r}: split the batch over other mesh axes "
                    f"than the layers, e.g. jdist.make_mesh(data=2, {axis}=4) with data_axis='data'.", axis, mesh.shape)
  checks.check_no_idle_axes(mesh, (axis, *data_axes), who="pipeline", fix="To split the batch over it, name "
                            "it in data_axis")
  sched = pipeline_schedule(mesh.shape[axis], microbatches, schedule, repeats=repeats)
  if isinstance(remat, str):
    remat = getattr(jax.checkpoint_policies, checks.check_choice(remat, "remat", REMAT_NAMES))
  cfg = PipelineConfig(stage_fn=stage_fn, loss_fn=loss_fn, input_fn=input_fn or batch_x, has_aux=has_aux, axis=axis,
                       data_axes=data_axes, schedule=sched, remat=remat)
  p, v = sched.num_stages, sched.repeats
  # virtual stages order the layer axis by device (``device_layer_order``): jdist.fit records it with each
  # checkpoint and refuses to resume one laid out otherwise (same shapes, other layers). Every round-robin
  # schedule shares "circular"'s order
  shape = "zbv" if schedule == "zbv" else "circular"
  layout = {"schedule": shape, "pipe": p, "repeats": v} if v > 1 and p > 1 else None  # else: model order
  return Strategy(init=functools.partial(init, cfg, optimizer, mesh),
                  shard_batch=functools.partial(shard_batch, cfg, mesh),
                  step=StepFn(functools.partial(step, cfg, optimizer, mesh), mesh, donate_argnums=0),
                  name=f"pipeline[{schedule}, p={p}, m={sched.microbatches}" + (f", v={v}]" if v > 1 else "]"),
                  mesh=mesh,
                  info=types.MappingProxyType({"schedule": sched, "layer_layout": layout, "config": cfg}))


def init(cfg: PipelineConfig, optimizer: Any, mesh: Mesh, params: Params, *, key: PRNGKey | int | None = None
         ) -> TrainState:
  """The state: the stacked layers in device order, split over the pipe axis; optimizer state alike."""
  params = checks.check_params(params)
  check_stages(params, cfg.schedule.num_stages, cfg.schedule.repeats)
  params = to_device_order(params, cfg.schedule)
  return sharded_state(params, param_shardings(params, cfg.axis, mesh), optimizer, mesh, key)


def batch_multiple(cfg: PipelineConfig, mesh: Mesh) -> int:
  """What the global batch size must divide by: data replicas x micro-batches."""
  return (mesh_lib.axis_size(mesh, cfg.data_axes) if cfg.data_axes else 1) * cfg.schedule.microbatches


def shard_batch(cfg: PipelineConfig, mesh: Mesh, batch: Batch) -> Batch:
  # one process: the global batch; several: this process's share (gathered on every host first when the
  # pipe axis spans the processes)
  return batch_lib.put_batch(batch, NamedSharding(mesh, cfg.batch_spec), multiple_of=batch_multiple(cfg, mesh),
                             gather=True)


def local_grads(cfg: PipelineConfig, params: Params, batch: Batch, key: jax.Array, step: jax.Array
                ) -> tuple[jax.Array, Any, Params, jax.Array]:
  """Inside ``shard_map``: the schedule's executor on this device, then the loss, aux and the gradients of
  the replicated entries summed over the pipe (and everything averaged over data replicas); idle stage-ticks.
  ``key``, ``step``: the state's, for functions that take a key."""
  # params["stages"]: this device's S / p layers [v c, ...], its v virtual stages of c layers
  params = vary_params(cfg, params)
  base = (key, step) if cfg.takes_key else None
  loss, aux, grads, active = EXECUTORS[cfg.schedule.name](cfg, params, batch, base)
  # the loss and aux live on the last device only: sum over the pipe; average over data replicas
  loss, aux = jax.lax.psum((loss, aux), cfg.axis)
  grads = {k: (val if k == "stages" else jax.lax.psum(val, cfg.axis)) for k, val in grads.items()}
  idle = cfg.schedule.num_stages * cfg.schedule.ticks - jax.lax.psum(active, cfg.axis)
  if cfg.data_axes:
    loss, aux, grads, idle = jax.lax.pmean((loss, aux, grads, idle), cfg.data_axes)
  return loss, aux, grads, idle


def step(cfg: PipelineConfig, optimizer: Any, mesh: Mesh, state: TrainState, batch: Batch):
  """One update: the pipeline's gradients (in ``shard_map`` over the mesh), then the shared step ending."""
  batch_lib.batch_size(batch, multiple_of=batch_multiple(cfg, mesh))
  specs = param_specs(state.params, cfg.axis)
  body = jax.shard_map(functools.partial(local_grads, cfg), mesh=mesh, in_specs=(specs, cfg.batch_spec, P(), P()),
                       out_specs=(P(), P(), specs, P()))
  loss, aux, grads, idle = body(state.params, batch, state.key, state.step)
  new_state = apply_update(state, grads, loss, optimizer, layout=(param_shardings(state.params, cfg.axis, mesh), mesh))
  stage_ticks = cfg.schedule.num_stages * cfg.schedule.ticks
  return new_state, metrics_from(loss, grads, aux, new_state.step, bubble=idle / stage_ticks,
                                 ticks=jnp.float32(cfg.schedule.ticks))
