"""``sharded``: parameters laid out over a named mesh by rules, compiled by GSPMD (``jax.jit``).

Tensor parallelism, FSDP (ZeRO-3) and their combinations on 2-D and 3-D meshes are all the same
strategy with different rules: the batch is split over the data (and FSDP) axes, each parameter and
its optimizer state over the axes its rule names, and XLA inserts the collectives. Output shardings
are fixed, so a step never changes the layout, and the state is donated.
"""
from __future__ import annotations

import types
from typing import Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._checks import check_callable, check_optimizer, check_params
from jdist._types import Batch, LossFn, Params, PRNGKey
from jdist.errors import OptionTypeError
from jdist.state import TrainState
from jdist.strategies.model_parallel._rules import (
  DEFAULT_FSDP_MIN_SIZE,
  Rule,
  check_min_size,
  partition_specs,
  rule_axes,
)
from jdist.strategy import StepFn, Strategy, apply_update, metrics_from, shard_keys, sharded_state, value_and_grad


def sharded(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    rules: Sequence[Rule] = (),
    data_axis: str | Sequence[str] | None = "data",
    fsdp_axis: str | None = None,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
    has_aux: bool = False,
) -> Strategy:
  """Model parallelism by sharding: tensor parallel, FSDP and data parallel on one mesh.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the global batch (written as for one
      device: GSPMD partitions it). A ``jdist.takes_key`` loss gets ``jdist.shard_key(state.key, state.step, 0)``
      for the whole global batch (one piece), as on one device; its random bits are the same however the
      batch is split over the devices (JAX's partitionable threefry).
    optimizer: any optax optimizer; its state is sharded like the parameters it mirrors.
    mesh: the device mesh, e.g. ``make_mesh(data=2, fsdp=2, model=2)``.
    rules: ``(pattern, spec)`` pairs for ``jdist.partition_specs`` (e.g. ``jdist.models.gpt.TP_RULES``).
    data_axis: the mesh axis (or tuple of axes) the batch is split over; the default "data" is ignored
      when the mesh has no such axis.
    fsdp_axis: shard every parameter of at least ``fsdp_min_size`` elements (and its optimizer state) over
      this axis as well; the batch is split over it too (ZeRO-3).

  Returns:
    A ``Strategy``; ``info`` (filled here, read-only): ``rules``, ``fsdp_axis``, ``fsdp_min_size`` and
    ``batch_axes``. The parameters' specs and the report follow from them:
    ``jdist.explain_sharding(params, info["rules"], mesh, fsdp_axis=..., fsdp_min_size=...)``. With ``has_aux``
    the aux values are those of the loss on the global batch, as on one device (the loss runs once,
    partitioned by GSPMD), not means over devices as the ``shard_map`` strategies report them.
  """
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  checks.check_mesh(mesh)
  if fsdp_axis is not None:
    checks.check_axes(mesh, fsdp_axis, what="fsdp_axis")
  fsdp_min_size = check_min_size(fsdp_min_size)
  if not isinstance(rules, (tuple, list)):
    raise OptionTypeError("rules", rules, "a sequence of (pattern, spec) pairs, e.g. jdist.models.gpt.TP_RULES")
  rules = tuple(rules)
  data_axes = () if data_axis is None else mesh_lib.as_axes(data_axis)
  if data_axes != ("data",):
    data_axes = checks.check_axes(mesh, data_axis, what="data_axis") if data_axes else ()
  # the batch is split over the data axes and the FSDP axis (ZeRO-3), each once, those the mesh has
  batch_axes = tuple(dict.fromkeys(a for a in (*data_axes, fsdp_axis) if a is not None and a in mesh.shape))
  checks.check_no_idle_axes(mesh, (*batch_axes, *rule_axes(rules)), who="sharded", fix="Split the batch over "
                              "it with data_axis, or the parameters with rules or fsdp_axis")
  n_batch = mesh_lib.axis_size(mesh, batch_axes) if batch_axes else 1
  batch_sharding = NamedSharding(mesh, P(batch_axes if batch_axes else None))
  vg = value_and_grad(loss_fn, has_aux=has_aux)
  info = {"rules": rules, "fsdp_axis": fsdp_axis, "fsdp_min_size": fsdp_min_size, "batch_axes": batch_axes}

  def param_shardings_of(params):
    """The parameters' shardings by the rules (the optimizer state follows them in ``sharded_state`` and
    ``pin_layout``); works on arrays, shapes and tracers alike."""
    specs, _ = partition_specs(params, rules, mesh, fsdp_axis=fsdp_axis, fsdp_min_size=fsdp_min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    params = check_params(params)
    return sharded_state(params, param_shardings_of(params), optimizer, mesh, key)

  def shard_batch(batch: Batch) -> Batch:
    # one process: the global batch; several: this process's share (jdist.batches.put_batch)
    return batch_lib.put_batch(batch, batch_sharding, multiple_of=n_batch)

  def step_fn(state: TrainState, batch: Batch):
    batch_lib.batch_size(batch, multiple_of=n_batch)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    # a takes_key loss runs once on the global batch, as on one device: the whole batch is piece 0
    keys = shard_keys(loss_fn, state.key, state.step, 0, 1)
    (loss, aux), grads = vg(state.params, batch, None if keys is None else keys[0])
    # pin the layout: the step's outputs have exactly the shardings init gave (rules evaluated at trace time)
    state = apply_update(state, grads, loss, optimizer, layout=(param_shardings_of(state.params), mesh))
    return state, metrics_from(loss, grads, aux, state.step)

  name = "sharded" + (f"[fsdp={fsdp_axis}]" if fsdp_axis else "") + (f"[{len(rules)} rules]" if rules else "")
  step = StepFn(step_fn, mesh, donate_argnums=0)
  return Strategy(init=init, shard_batch=shard_batch, step=step, name=name, mesh=mesh,
                  info=types.MappingProxyType(info))
