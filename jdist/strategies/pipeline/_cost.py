"""FLOPs of a pipeline step per device, from XLA's cost analysis of each op compiled on its own, and the
step's modelled time from a schedule's table and its ops' costs.

The compiled step's own ``cost_analysis()`` cannot say what the step computes: XLA counts a loop's body
once (the tick loop runs T times) and a conditional as its costliest branch (each tick's ``lax.switch``
holds every kind of op). So each op of a middle virtual stage is compiled alone, in the same
``shard_map`` and at the step's shapes: F; F then B; F, B then W (the differences give B and W), with an
``optimization_barrier`` between them so that XLA cannot merge B's recomputation with F (in the step
they run ticks apart). For "gpipe" and "circular", F is one tick's forward (the tick's ``jax.checkpoint``
with its policy, the stage's loop unrolled) and B its pullback. ``step_flops`` adds them up over the table: a
1F1B-family device runs its cells, a GPipe device its stage on every tick (idle ones too: the bubble is
wasted compute there).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jdist._types import Batch, Params
from jdist.strategies.pipeline import _gpipe, _ticks
from jdist.strategies.pipeline._layout import param_specs
from jdist.strategies.pipeline._stage import PipelineConfig, micro_batches, run_stage, vary_params


def _total(tree: Any) -> jax.Array:
  """One scalar that depends on every value of ``tree`` (so XLA keeps all of it), summed over the mesh."""
  return sum(jnp.sum(a.astype(jnp.float32)) for a in jax.tree.leaves(tree))


def _ticks_ops(cfg: PipelineConfig, ops: int, params: Params, batch: Batch) -> jax.Array:
  """The first ``ops`` of F, B, W of micro-batch 0 on this device's first virtual stage, as a middle stage."""
  dev, _ = _ticks.device(cfg, params, batch, None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  x = micro_batches(batch, cfg.schedule.microbatches)(0)
  x = cfg.varying(cfg.input_fn(params, x))  # a real activation, not zeros XLA could fold
  y, stash, _ = _ticks.forward(dev, 0, 0, 0, x, False, False, (zeros, 0.0, None))
  out = [y, stash]
  if ops > 1:
    y, stash = jax.lax.optimization_barrier((y, stash))
    g, carry, grads = _ticks.backward(dev, 0, 0, 0, y, stash, False, cfg.schedule.split_backward, zeros)
    out += [g, grads]
    if ops > 2:
      stash, carry = jax.lax.optimization_barrier((stash, carry))
      out.append(_ticks.weight(dev, 0, 0, 0, stash, carry, zeros))
  return _total(out)


def _gpipe_ops(cfg: PipelineConfig, ops: int, params: Params, batch: Batch) -> jax.Array:
  """One GPipe tick's stage forward (``ops`` = 1) or forward and pullback (2), under the tick's policy."""
  x = cfg.varying(cfg.input_fn(params, micro_batches(batch, cfg.schedule.microbatches)(0)))
  stage = jax.checkpoint(lambda w, x: run_stage(cfg, w, 0, x, unroll=True), policy=_gpipe.tick_policy(params, cfg),
                         prevent_cse=False)
  y, pullback = jax.vjp(stage, params["stages"], x)
  if ops == 1:
    return _total(y)
  leaves, tree = jax.tree.flatten(pullback)
  y, leaves = jax.lax.optimization_barrier((y, leaves))
  return _total([y, jax.tree.unflatten(tree, leaves)(y)])


def op_flops(strategy: Any, state: Any, batch: Batch) -> dict[str, float]:
  """FLOPs per device of one op of a middle virtual stage: ``{"F", "B"}`` (and ``"W"`` for split tables).

  ``strategy`` is a pipeline, ``state`` its state (or ``jax.eval_shape`` of it), ``batch`` from its
  ``shard_batch``. Each op is compiled once, alone (see the module docstring).
  """
  cfg, mesh = strategy.info["config"], strategy.mesh
  kinds = ["F", "B"] + (["W"] if cfg.schedule.split_backward else [])
  run = _gpipe_ops if cfg.schedule.op is None else _ticks_ops
  specs = param_specs(state.params, cfg.axis)
  totals = []
  for ops in range(1, len(kinds) + 1):
    def body(params, batch, ops=ops):
      return jax.lax.psum(run(cfg, ops, vary_params(cfg, params), batch), cfg.all_axes)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(specs, cfg.batch_spec), out_specs=P())
    cost = jax.jit(fn).lower(state.params, batch).compile().cost_analysis()
    totals.append(float((cost[0] if isinstance(cost, list) else cost)["flops"]))
  return dict(zip(kinds, np.diff([0.0] + totals)))


def step_flops(strategy: Any, state: Any, batch: Batch) -> np.ndarray:
  """float[p]: FLOPs of the stage ops each pipe device runs in one step (``op_flops`` times the table's
  cells; GPipe and circular run the stage on every tick). The input function and the loss are not counted."""
  sched = strategy.info["schedule"]
  cost = op_flops(strategy, state, batch)
  if sched.op is None:
    return np.full(sched.num_stages, sched.ticks * (cost["F"] + cost["B"]))
  return np.array([sum(cost[str(o)] for o in sched.op[:, d] if o != ".") for d in range(sched.num_stages)])



def device_orders(schedule: Any) -> list[list[tuple[str, int, int]]]:
  """Each device's ops ``(kind, micro-batch, virtual stage)`` in the order it runs them: the table's, and
  for "gpipe" / "circular" the forward ticks, then the backwards as ``jax.grad`` runs them (in reverse)."""
  orders = []
  for d in range(schedule.num_stages):
    cells = [(t, int(schedule.table[t, d]), int(schedule.stage_ids[d, schedule.lap[t, d]]))
             for t in range(schedule.ticks) if schedule.table[t, d] >= 0]
    if schedule.op is None:
      orders.append([("F", i, j) for _, i, j in cells] + [("B", i, j) for _, i, j in cells[::-1]])
    else:
      orders.append([(str(schedule.op[t, d]), i, j) for t, i, j in cells])
  return orders


def modelled_time(schedule: Any, cost: dict[str, float], *, lockstep: bool = True) -> float:
  """One step's time when each op lasts ``cost[kind]`` ("F", "B", "W": per virtual stage; a GPipe "B" is a
  tick's backward), communication free.

  ``lockstep``: as jdist runs it, every device on the same tick, each tick as long as its costliest op
  (GPipe and circular run the stage on every tick, idle or not: ticks x (F + B)). Otherwise each device
  runs its ops in order, each as soon as its device is free and its inputs exist: the model of the
  papers and of torch's asynchronous runtime.
  """
  if lockstep:
    if schedule.op is None:
      return schedule.ticks * (cost["F"] + cost["B"])
    return float(sum(max([cost[str(o)] for o in row if o != "."] or [0.0]) for row in schedule.op))
  orders, last = device_orders(schedule), schedule.stage_ids.size - 1
  done: dict[tuple[str, int, int], float] = {}
  free, pos = [0.0] * len(orders), [0] * len(orders)
  while any(pos[d] < len(ops) for d, ops in enumerate(orders)):
    progressed = False
    for d, ops in enumerate(orders):
      while pos[d] < len(ops):
        kind, i, j = ops[pos[d]]
        needs = {"F": [("F", i, j - 1)] if j else [], "W": [("B", i, j)],
                 "B": [("F", i, j)] + ([("B", i, j + 1)] if j < last else [])}[kind]
        if any(n not in done for n in needs):
          break
        free[d] = max([free[d]] + [done[n] for n in needs]) + cost[kind]
        done[kind, i, j], pos[d], progressed = free[d], pos[d] + 1, True
    if not progressed:
      raise RuntimeError("The device orders deadlock.")
  return max(free)
