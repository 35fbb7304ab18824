"""1F1B (PipeDream-Flush): forwards and backwards in one ``lax.scan``, the backward written by hand.

At each tick a device does at most one op from the schedule's table: the forward of micro-batch i, the
backward of micro-batch j, or nothing. A forward stashes its stage input (in a slot ``stash_intervals``
assigns); the backward recomputes the stage under ``jax.vjp`` and applies the cotangent received from
the next device; the last device starts each backward from ``jax.vjp`` of the loss (its forward only
stashes), the first ends it with ``jax.vjp`` of ``input_fn``. A device runs forwards on ticks of its own
parity and backwards on the others, so each tick it sends either an activation on or a cotangent back:
one ``ppermute`` per tick on every device (pairing neighbours one way on even ticks, the other way on odd
ones); ``lax.switch`` on the table entry picks the compute. Idle devices skip the compute and only take
part in the ``ppermute``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdist._types import Batch, Params
from jdist.strategies.pipeline._schedules import BACKWARD, FORWARD, Schedule, stash_intervals
from jdist.strategies.pipeline._stage import (
  PipelineConfig,
  activation_type,
  add_sums,
  micro_batches,
  run_stage,
  zero_sums,
)

IDLE, FORWARD_OP, STASH, BACKWARD_OP = range(4)  # lax.switch branches; STASH: a forward on the last device


class Plan(NamedTuple):
  """What the executor reads at each tick, from the schedule (numpy, built at trace time)."""

  op: np.ndarray  # int[T, p]: IDLE, FORWARD_OP, STASH or BACKWARD_OP
  micro: np.ndarray  # int[T, p]: the micro-batch (0 when idle)
  slot: np.ndarray  # int[T, p]: its stash slot (0 when idle)
  slots: int  # stash slots per device: the peak stash
  sends: tuple[list[tuple[int, int]], list[tuple[int, int]]]  # ppermute pairs on even and odd ticks


def plan(schedule: Schedule) -> Plan:
  """The executor's view of a table of F and B cells, checked to send at most one way per device per tick."""
  p, busy = schedule.num_stages, schedule.table >= 0
  backward = schedule.op == BACKWARD
  # at tick t device s runs forwards only if s = t (mod 2) and backwards only if not (1F1B: forward of i at
  # 2i + s, backward at 2i + 2p - 1 - s), so it sends an activation to s + 1 or a cotangent to s - 1
  parity = (np.arange(schedule.ticks)[:, None] - np.arange(p)[None, :]) % 2
  if not (np.all(parity[busy] == backward[busy]) and set(schedule.op[busy]) <= {FORWARD, BACKWARD}):
    raise RuntimeError(f"The {schedule.name} table has a cell this executor cannot run: it runs F and B cells "
                       f"only, forwards on ticks of the device's parity and backwards on the others.")
  op = np.where(~busy, IDLE, np.where(backward, BACKWARD_OP, FORWARD_OP))
  op[:, p - 1] = np.where(op[:, p - 1] == FORWARD_OP, STASH, op[:, p - 1])  # its output would go nowhere
  sends = tuple([(s, s + 1) if s % 2 == t else (s, s - 1) for s in range(p) if (s + 1 < p if s % 2 == t else s > 0)]
                for t in (0, 1))
  slot, held = stash_intervals(schedule)
  return Plan(op.astype(np.int32), np.maximum(schedule.table, 0), np.maximum(slot, 0), int(held.max()), sends)


class Device(NamedTuple):
  """One device's constants for the ticks (traced values of this step)."""

  cfg: PipelineConfig
  params: Params  # varying over every mesh axis; params["stages"]: [c, ...] this device's layers
  pick: Callable[[jax.Array], Batch]
  d: jax.Array  # this device's index on the pipe axis
  zeros_x: jax.Array  # x: [mb, ...]
  loss_type: jax.ShapeDtypeStruct


def backward(dev: Device, stashed: jax.Array, received: jax.Array, i: jax.Array, grads: Params, loss: jax.Array,
             aux: Any) -> tuple:
  """Micro-batch i's backward through this device's stage (recomputed from its stashed input); the first
  device adds the input function's gradients, the last starts from the loss and adds its own."""
  cfg, params, p, m = dev.cfg, dev.params, dev.cfg.schedule.num_stages, dev.cfg.schedule.microbatches
  y, stage_vjp = jax.vjp(lambda stages, x: run_stage(cfg, stages, 0, x), params["stages"], stashed)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)

  def from_loss():  # last device: d(loss_i / m) / dy, and the loss's own parameter gradients
    loss_i, loss_vjp, aux_i = jax.vjp(lambda prm, y: cfg.head(prm, y, dev.pick(i)), params, y, has_aux=True)
    g_params, g_y = loss_vjp(cfg.varying(jnp.full(dev.loss_type.shape, 1 / m, dev.loss_type.dtype)))
    return loss + loss_i.astype(jnp.float32), add_sums(aux, aux_i), g_y, add(grads, g_params)

  loss, aux, g_y, grads = jax.lax.cond(dev.d == p - 1, from_loss, lambda: (loss, aux, received, grads))
  g_stages, g_x = stage_vjp(g_y)

  def into_input(acc):  # first device: the input function's parameter gradients (e.g. the embedding)
    return add(acc, jax.vjp(lambda prm: cfg.input_fn(prm, dev.pick(i)), params)[1](g_x)[0])

  grads = jax.lax.cond(dev.d == 0, into_input, lambda acc: acc, grads)
  return g_x, stashed, dict(grads, stages=add(grads["stages"], g_stages)), loss, aux


def tick(dev: Device, pl: Plan, carry: tuple, t: int | jax.Array, perm: list[tuple[int, int]]) -> tuple:
  """One tick on this device: the table's op, then the one ``ppermute`` of the tick."""
  received, stash, grads, loss, aux, active = carry  # stash: [slots, mb, ...]
  op, i, slot = (jnp.asarray(a)[t, dev.d] for a in (pl.op, pl.micro, pl.slot))
  stashed = jax.lax.dynamic_index_in_dim(stash, slot, 0, keepdims=False)
  # what arrived last tick: an activation from d - 1 if this tick is a forward, else a cotangent from d + 1
  stage_input = lambda: jax.lax.cond(dev.d == 0, lambda: dev.cfg.input_fn(dev.params, dev.pick(i)), lambda: received)

  # each branch: (what to send, the stash slot's new content, the gradient, loss and aux sums)
  def forward():
    x = stage_input()
    return run_stage(dev.cfg, dev.params["stages"], 0, x), x, grads, loss, aux

  branches = [lambda: (dev.zeros_x, stashed, grads, loss, aux),  # idle
              forward,
              lambda: (dev.zeros_x, stage_input(), grads, loss, aux),  # stash only (last device)
              lambda: backward(dev, stashed, received, i, grads, loss, aux)]
  send, slot_value, grads, loss, aux = jax.lax.switch(op, branches)
  stash = jax.lax.dynamic_update_index_in_dim(stash, slot_value, slot, 0)
  if dev.cfg.schedule.num_stages > 1:  # one ppermute per tick on every device (zeros when it has nothing)
    received = jax.lax.ppermute(send, dev.cfg.axis, perm)
  return received, stash, grads, loss, aux, active + (op != IDLE).astype(jnp.int32)


def local_grads(cfg: PipelineConfig, params: Params, batch: Batch) -> tuple[jax.Array, Any, Params, jax.Array]:
  """``(loss, aux, grads, busy ticks)`` on this device (the loss on the last device, / m; the gradients
  summed over micro-batches, this device's share), with a hand-written backward."""
  sched, pl = cfg.schedule, plan(cfg.schedule)
  pick = micro_batches(batch, sched.microbatches)
  x_type = activation_type(cfg, params, pick(0))
  zeros_x = cfg.varying(jnp.zeros(x_type.shape, x_type.dtype))
  loss_type, aux_type = jax.eval_shape(lambda: cfg.head(params, zeros_x, pick(0)))
  dev = Device(cfg, params, pick, jax.lax.axis_index(cfg.axis), zeros_x, loss_type)

  def two_ticks(carry, j):  # the ticks alternate between the two send patterns
    return tick(dev, pl, tick(dev, pl, carry, 2 * j, pl.sends[0]), 2 * j + 1, pl.sends[1]), None

  stash = cfg.varying(jnp.zeros((pl.slots, *x_type.shape), x_type.dtype))
  zero_grads = jax.tree.map(lambda x: cfg.varying(jnp.zeros(x.shape, x.dtype)), params)
  init = (zeros_x, stash, zero_grads, cfg.varying(jnp.zeros((), jnp.float32)), zero_sums(aux_type, cfg),
          cfg.varying(jnp.zeros((), jnp.int32)))
  (_, _, grads, loss, aux, active), _ = jax.lax.scan(two_ticks, init, jnp.arange(sched.ticks // 2))
  m = sched.microbatches
  return loss / m, jax.tree.map(lambda a: a / m, aux), grads, active
