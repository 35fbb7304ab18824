"""The 1F1B family ("1f1b", "interleaved_1f1b", "zb_h1", "zbv"): a schedule's table run tick by tick in one
``lax.scan``, with a hand-written backward.

At each tick a device runs the op of its cell: F (forward of a micro-batch through one of its virtual
stages), B (backward: the input gradient, and the weight gradient too unless the table has W cells), W
(weight gradient) or nothing. Each layer's VJP is taken apart once at trace time (``_residuals``): F
stashes what the backward needs (the activation-dependent residuals, or fewer under a ``remat`` policy),
B and W read it back; nothing that depends on the weights alone is stashed. The last virtual stage's F
also runs the loss and its VJP, so its B starts from the cotangent that F left; the first stage's B ends
with the VJP of ``input_fn``.

Messages (an activation for the next stage's F, a cotangent for the previous stage's B) go to a
neighbouring device, or stay on the device (the turn of the "zbv" V, one device). What arrives waits in
the receiving device's inbox until its op runs (an interleaved or zero-bubble device may receive an
activation ticks before it uses it). Sends are ``ppermute``s, two ticks per scan step: on each of the two
tick parities, one ``ppermute`` if every device always sends the same way there (1F1B: a device
forwards on ticks of its own parity and sends cotangents on the others), otherwise one per direction.
``plan`` turns the table into these per-tick indices (numpy, at trace time). Idle devices skip the compute
and only take part in the ``ppermute``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdist._types import Batch, Params
from jdist.strategies.pipeline._orders import BACKWARD, FORWARD, WEIGHT
from jdist.strategies.pipeline._residuals import LayerVjp, layer_vjp
from jdist.strategies.pipeline._schedules import Schedule, allocate, op_ticks
from jdist.strategies.pipeline._stage import (
  PipelineConfig,
  activation_type,
  add_sums,
  layer_key,
  micro_batches,
  zero_sums,
)
from jdist.strategy import KeyedLoss

# lax.switch branches: F of a middle stage, of the first (runs input_fn), the last (runs the loss), both
IDLE, F_MID, F_FIRST, F_LAST, F_ONLY, B_MID, B_FIRST, W_OP = range(8)


class Plan(NamedTuple):
  """What the executor reads at each tick (int[T, p] arrays, T even), from the schedule."""

  branch: np.ndarray  # IDLE, F_*, B_*, W_OP
  micro: np.ndarray  # the micro-batch (0 when idle)
  lap: np.ndarray  # the device's virtual stage (its lap) the op runs
  stage: np.ndarray  # that virtual stage's index in model order
  read: np.ndarray  # the inbox slot the op reads (F: its activation, B: its cotangent); the spare slot else
  stash: np.ndarray  # the stash slot of the op's micro-batch on this stage (F writes it, B and W read it)
  carry: np.ndarray  # the slot of what B hands to W
  recv: np.ndarray  # int[K, T, p]: the inbox slot for what the tick's k-th ppermute brings (spare: nothing)
  local: np.ndarray  # the inbox slot for the device's message to itself (spare: none)
  sends: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]  # per tick parity: each ppermute's pairs
  slots: tuple[int, int, int]  # inbox (the last one spare), stash and carry slots per device


def _messages(schedule: Schedule, when: dict, where: dict) -> list[tuple[int, int, int, tuple[int, int]]]:
  """Every message as (tick sent, sender, receiver, the cell (tick, device) that uses it): F of stage j
  sends to F of j + 1 (the last stage's F to its own B: the loss's cotangent), B of j > 0 to B of j - 1."""
  last, found = schedule.stage_ids.size - 1, []
  for (o, i, j), (t,) in when.items():
    target = ((FORWARD, i, j + 1) if j < last else (BACKWARD, i, j)) if o == FORWARD else (
        (BACKWARD, i, j - 1) if o == BACKWARD and j > 0 else None)
    if target is not None:
      found.append((t, where[j], where[target[2]], (when[target][0], where[target[2]])))
  return found


def _send_groups(pairs: set[tuple[int, int]], p: int) -> tuple[tuple[tuple[int, int], ...], ...]:
  """The ppermutes that carry ``pairs`` (src, dst): one if no device sends or receives twice, else one per
  direction round the ring."""
  if len({s for s, _ in pairs}) == len(pairs) == len({d for _, d in pairs}):
    return (tuple(sorted(pairs)),) if pairs else ()
  up = {(s, d) for s, d in pairs if d == (s + 1) % p}
  return tuple(tuple(sorted(g)) for g in (up, pairs - up) if g)


def _slots(spans: list[tuple[int, int, int, Any]], p: int) -> tuple[dict, int]:
  """Buffer slots per device for values held over ticks: spans (first, last, device, key) -> ({key: slot}, the
  most slots a device uses)."""
  slot_of, most = {}, 0
  for dev in range(p):
    mine = [s for s in spans if s[2] == dev]
    slots, used = allocate([(a, b) for a, b, _, _ in mine])
    slot_of.update((s[3], k) for s, k in zip(mine, slots))
    most = max(most, used)
  return slot_of, most


def plan(schedule: Schedule) -> Plan:
  """The executor's view of a table of F / B / W cells: branches, buffer slots and sends per tick."""
  if schedule.op is None:
    raise RuntimeError(f"The {schedule.name} table has no backward cells: it runs under _gpipe.")
  ticks, p = schedule.table.shape
  ticks += ticks % 2  # the scan runs the ticks in pairs
  when, last = op_ticks(schedule), schedule.stage_ids.size - 1
  where = {int(j): d for d, row in enumerate(schedule.stage_ids) for j in row}
  branch, micro, lap, stage, read, stash, carry, local = (np.zeros((ticks, p), np.int32) for _ in range(8))
  # the inbox holds each message from its arrival to its use; the stash a micro-batch's residuals on a
  # stage from its F to its last backward op; the carry what B hands to W
  msgs = _messages(schedule, when, where)
  inbox, n_in = _slots([(t + 1, use[0], dst, use) for t, _, dst, use in msgs], p)
  stashed, n_st = _slots([(when[FORWARD, i, j][0], max(when.get((o, i, j), [-1])[0] for o in (BACKWARD, WEIGHT)),
                           where[j], (i, j)) for (o, i, j) in when if o == FORWARD], p)
  carried, n_cr = _slots([(when[BACKWARD, i, j][0], when[WEIGHT, i, j][0], where[j], (i, j))
                          for (o, i, j) in when if o == WEIGHT], p)
  read[:], local[:] = n_in, n_in  # the spare slot: reads and writes that mean nothing
  for (o, i, j), (t,) in when.items():
    d = where[j]
    micro[t, d], lap[t, d], stage[t, d] = i, schedule.lap[t, d], j
    branch[t, d] = (W_OP if o == WEIGHT else (B_FIRST if j == 0 else B_MID) if o == BACKWARD
                    else [F_MID, F_FIRST, F_LAST, F_ONLY][(j == 0) + 2 * (j == last)])
    read[t, d], stash[t, d], carry[t, d] = inbox.get((t, d), n_in), stashed[i, j], carried.get((i, j), 0)
  pairs = [{(s, d) for t, s, d, _ in msgs if s != d and t % 2 == parity} for parity in (0, 1)]
  sends = tuple(_send_groups(pairs[parity], p) for parity in (0, 1))
  recv = np.full((max(1, *map(len, sends)), ticks, p), n_in, np.int32)
  for t, s, d, use in msgs:
    if s == d:
      local[t, d] = inbox[use]
    else:
      recv[next(k for k, group in enumerate(sends[t % 2]) if (s, d) in group), t, d] = inbox[use]
  return Plan(branch, micro, lap, stage, read, stash, carry, recv, local, sends, (n_in + 1, max(1, n_st), max(1, n_cr)))


class Device(NamedTuple):
  """One device's constants for the ticks (traced values of this step)."""

  cfg: PipelineConfig
  params: Params  # varying over every mesh axis; params["stages"]: [v c, ...] this device's layers
  pick: Callable[[jax.Array], Batch]
  zeros_x: jax.Array  # x: [mb, ...]
  loss_type: jax.ShapeDtypeStruct
  vjp: LayerVjp  # one layer's forward and backward, taken apart
  layers: int  # c, layers per virtual stage
  base: tuple[jax.Array, jax.Array] | None  # (state.key data, state.step) for takes_key functions


def layer_fn(cfg: PipelineConfig) -> Callable[[Params, Any, jax.Array], jax.Array]:
  """One layer as ``_residuals`` takes it: ``(layer, key data or None, x) -> x``."""
  return lambda w, aux, x: cfg.layer(w, x, None if aux is None else jax.random.wrap_key_data(aux))


def keys(dev: Device, i: jax.Array, stage: jax.Array) -> tuple[jax.Array | None, list]:
  """Micro-batch i's key (for the loss) and the key data of the layers of virtual stage ``stage`` (their
  index in model order: stage c + k), None where nothing takes a key."""
  key = dev.cfg.micro_key(dev.base, i)
  if key is None or not isinstance(dev.cfg.stage_fn, KeyedLoss):
    return key, [None] * dev.layers
  return key, [jax.random.key_data(layer_key(key, stage * dev.layers + k)) for k in range(dev.layers)]


def layer(dev: Device, lap: jax.Array, k: int) -> Params:
  """Layer k of this device's virtual stage ``lap``."""
  return jax.tree.map(lambda a: a[lap * dev.layers + k], dev.params["stages"])


def add_layer(grads: Params, index: jax.Array, g_layer: Params) -> Params:
  return dict(grads, stages=jax.tree.map(lambda acc, g: acc.at[index].add(g), grads["stages"], g_layer))


def forward(dev: Device, i, lap, stage, x, first: bool, last: bool, sums: tuple) -> tuple:
  """F: the stage's layers on x (or on ``input_fn``'s output), stashing what the backward needs; on the last
  stage also the loss and its VJP. Returns (message: the activation or the loss's cotangent, stash, sums)."""
  cfg, params = dev.cfg, dev.params
  key, layer_keys = keys(dev, i, stage)
  x = cfg.input_fn(params, dev.pick(i)) if first else x
  stashes = []
  for k in range(dev.layers):
    x, st = dev.vjp.forward(layer(dev, lap, k), layer_keys[k], x)
    stashes.append(st)
  stash = [jnp.stack(r) for r in zip(*stashes)]  # each [c, ...]
  if not last:
    return x, stash, sums
  grads, loss, aux = sums
  loss_i, head_vjp, aux_i = jax.vjp(lambda prm, y: cfg.head(prm, y, dev.pick(i), key), params, x, has_aux=True)
  g_params, g_y = head_vjp(cfg.varying(jnp.full(dev.loss_type.shape, 1 / cfg.schedule.microbatches,
                                                dev.loss_type.dtype)))
  grads = jax.tree.map(jnp.add, grads, g_params)
  return g_y, stash, (grads, loss + loss_i.astype(loss.dtype), add_sums(aux, aux_i))


def backward(dev: Device, i, lap, stage, g, stash: list, first: bool, split: bool, grads: Params) -> tuple:
  """B: the cotangent back through the stage's layers (and their weight gradients unless ``split``: then
  what W needs is returned as the carry); the first stage adds ``input_fn``'s parameter gradients."""
  _, layer_keys = keys(dev, i, stage)
  carries = [None] * dev.layers
  for k in reversed(range(dev.layers)):
    st = [s[k] for s in stash]
    if split:
      g, carries[k] = dev.vjp.input_grad(layer(dev, lap, k), layer_keys[k], st, g)
    else:
      g_layer, g = dev.vjp.backward(layer(dev, lap, k), layer_keys[k], st, g)
      grads = add_layer(grads, lap * dev.layers + k, g_layer)
  if first:
    g_params = jax.vjp(lambda prm: dev.cfg.input_fn(prm, dev.pick(i)), dev.params)[1](g)[0]
    grads = jax.tree.map(jnp.add, grads, g_params)
  return g, [jnp.stack(r) for r in zip(*carries)] if split else [], grads


def weight(dev: Device, i, lap, stage, stash: list, carry: list, grads: Params) -> Params:
  """W: the weight gradients of the stage's layers, from the stash and B's carry."""
  _, layer_keys = keys(dev, i, stage)
  for k in range(dev.layers):
    g_layer = dev.vjp.weight_grad(layer(dev, lap, k), layer_keys[k], [s[k] for s in stash], [c[k] for c in carry])
    grads = add_layer(grads, lap * dev.layers + k, g_layer)
  return grads


def tick(dev: Device, pl: Plan, codes: np.ndarray, carry: tuple, t: jax.Array, sends) -> tuple:
  """One tick on this device: the table's op, then the tick's ``ppermute``s into the inboxes."""
  inbox, stash, wcarry, grads, loss, aux, active = carry  # inbox: [slots, mb, ...]; stash, wcarry: lists
  d = jax.lax.axis_index(dev.cfg.axis)
  at = lambda a: jnp.asarray(a)[t, d]
  i, lap, stage = at(pl.micro), at(pl.lap), at(pl.stage)
  incoming = inbox[at(pl.read)]
  st = [b[at(pl.stash)] for b in stash]
  cr = [b[at(pl.carry)] for b in wcarry]
  split = dev.cfg.schedule.split_backward

  def run_f(first, last):
    def f():
      msg, new_st, (g, lo, au) = forward(dev, i, lap, stage, incoming, first, last, (grads, loss, aux))
      return msg, new_st, cr, g, lo, au
    return f

  def run_b(first):
    def b():
      msg, new_cr, g = backward(dev, i, lap, stage, incoming, st, first, split, grads)
      return msg, st, new_cr if split else cr, g, loss, aux
    return b

  branches = {IDLE: lambda: (dev.zeros_x, st, cr, grads, loss, aux), F_MID: run_f(False, False),
              F_FIRST: run_f(True, False), F_LAST: run_f(False, True), F_ONLY: run_f(True, True),
              B_MID: run_b(False), B_FIRST: run_b(True),
              W_OP: lambda: (dev.zeros_x, st, cr, weight(dev, i, lap, stage, st, cr, grads), loss, aux)}
  index = jnp.asarray(np.searchsorted(codes, pl.branch).astype(np.int32))[t, d]
  msg, st, cr, grads, loss, aux = jax.lax.switch(index, [branches[int(c)] for c in codes])
  stash = [jax.lax.dynamic_update_index_in_dim(b, v, at(pl.stash), 0) for b, v in zip(stash, st)]
  wcarry = [jax.lax.dynamic_update_index_in_dim(b, v, at(pl.carry), 0) for b, v in zip(wcarry, cr)]
  for k, pairs in enumerate(sends):
    inbox = jax.lax.dynamic_update_index_in_dim(inbox, jax.lax.ppermute(msg, dev.cfg.axis, pairs), at(pl.recv[k]), 0)
  inbox = jax.lax.dynamic_update_index_in_dim(inbox, msg, at(pl.local), 0)
  return inbox, stash, wcarry, grads, loss, aux, active + (at(pl.branch) != IDLE).astype(jnp.int32)


def device(cfg: PipelineConfig, params: Params, batch: Batch, base: tuple | None) -> tuple[Device, Plan]:
  """This device's constants and the plan: the layer's VJP is traced here, at the types every tick uses."""
  pl = plan(cfg.schedule)
  pick = micro_batches(batch, cfg.schedule.microbatches)
  x_type = activation_type(cfg, params, pick(0))
  zeros_x = cfg.varying(jnp.zeros(x_type.shape, x_type.dtype))
  loss_type, _ = jax.eval_shape(lambda: cfg.head(params, zeros_x, pick(0), cfg.micro_key(base, 0)))
  c = jax.tree.leaves(params["stages"])[0].shape[0] // cfg.schedule.repeats
  dev = Device(cfg, params, pick, zeros_x, loss_type, None, c, base)
  d = jax.lax.axis_index(cfg.axis)
  i0, j0 = jnp.asarray(pl.micro)[0, d], jnp.asarray(pl.stage)[0, d]  # typed like every tick's values
  return dev._replace(vjp=layer_vjp(layer_fn(cfg), layer(dev, 0, 0), keys(dev, i0, j0)[1][0], zeros_x, cfg.remat)), pl


def local_grads(cfg: PipelineConfig, params: Params, batch: Batch, base: tuple | None = None
                ) -> tuple[jax.Array, Any, Params, jax.Array]:
  """``(loss, aux, grads, busy ticks)`` on this device (the loss on the device of the last stage, / m; the
  gradients summed over micro-batches, this device's share), with a hand-written backward. ``base``:
  (state.key data, state.step) when a function takes a key."""
  dev, pl = device(cfg, params, batch, base)
  n_in, n_st, n_cr = pl.slots
  buffers = lambda n, types: [cfg.varying(jnp.zeros((n, dev.layers, *a.shape), a.dtype)) for a in types]
  codes = np.unique(pl.branch)

  def two_ticks(carry, j):  # the ticks alternate between the send patterns of the two parities
    carry = tick(dev, pl, codes, carry, 2 * j, pl.sends[0])
    return tick(dev, pl, codes, carry, 2 * j + 1, pl.sends[1]), None

  aux_type = jax.eval_shape(lambda: cfg.head(params, dev.zeros_x, dev.pick(0), cfg.micro_key(base, 0)))[1]
  zero_grads = jax.tree.map(lambda x: cfg.varying(jnp.zeros(x.shape, x.dtype)), params)
  init = (cfg.varying(jnp.zeros((n_in, *dev.zeros_x.shape), dev.zeros_x.dtype)), buffers(n_st, dev.vjp.stash_types),
          buffers(n_cr, dev.vjp.carry_types if cfg.schedule.split_backward else []), zero_grads,
          cfg.varying(jnp.zeros((), jnp.float32)), zero_sums(aux_type, cfg), cfg.varying(jnp.zeros((), jnp.int32)))
  (_, _, _, grads, loss, aux, active), _ = jax.lax.scan(two_ticks, init, jnp.arange(pl.branch.shape[0] // 2))
  m = cfg.schedule.microbatches
  return loss / m, jax.tree.map(lambda a: a / m, aux), grads, active
