"""GPipe and circular GPipe: the forward ticks in one ``lax.scan``; ``jax.grad`` of it runs them backwards.

Every device runs its stage every tick (SPMD); an idle tick's output is dropped and its gradient gated to
exact zeros, so the bubble is wasted compute, as the schedule table says. The input function and the loss
run under ``lax.cond``, only where the table needs them. The weights stay loop constants: the backward
keeps activations per tick, not copies of the weights (``weights_only``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdist._types import Batch, Params
from jdist.strategies.pipeline._residuals import saved
from jdist.strategies.pipeline._stage import (
  PipelineConfig,
  activation_type,
  add_sums,
  micro_batches,
  run_stage,
  zero_sums,
)


def gate(working: jax.Array, tree: Any) -> Any:
  """``tree`` unchanged; its cotangent passes where ``working`` and is exactly zero elsewhere (NaN included)."""
  return jax.tree.map(lambda a: jax.lax.select_n(working, jax.lax.stop_gradient(a), a), tree)


def weights_only(params: Params, v: int) -> Callable[..., bool]:
  """A ``jax.checkpoint`` policy that saves every value except those computed from the parameters alone.

  An operation whose array operands all have the shape of a parameter (this device's layers [v c, ...],
  a virtual stage's [c, ...], a layer's [...], or another entry of ``params``), in any dtype, is taken to
  compute from weights alone (the lap's slice, the gated weights, a cast to the compute dtype, a
  transpose): the backward recomputes it from the weights, which stay loop constants, rather than keep
  it once per tick. An activation of such a shape is recomputed too: compute, never correctness.
  """
  shapes = set()
  for name, tree in params.items():
    for a in jax.tree.leaves(tree):
      shapes.add(a.shape)
      if name == "stages":
        shapes.update({a.shape[1:], (a.shape[0] // v, *a.shape[1:])})

  def saveable(prim, *avals, **params) -> bool:
    return not all(a.shape in shapes for a in avals if getattr(a, "shape", ()))

  return saveable


def tick_policy(params: Params, cfg: PipelineConfig) -> Callable[..., bool]:
  """What a tick keeps for the backward: ``weights_only``, and of that only what ``cfg.remat`` saves."""
  weights = weights_only(params, cfg.schedule.repeats)
  if cfg.remat is None:
    return weights
  return lambda prim, *avals, **kw: weights(prim, *avals, **kw) and saved(cfg.remat(prim, *avals, **kw))


def tick_compute(cfg: PipelineConfig, pick: Callable, zero_x: jax.Array, base: tuple | None, params: Params,
                 received: jax.Array, i: jax.Array, lap: jax.Array, loss: jax.Array, aux: Any
                 ) -> tuple[jax.Array, jax.Array, Any]:
  """One device's work at one tick on micro-batch ``i`` (-1: idle), virtual stage ``lap``: the activations
  to send on, and the loss and aux sums (added to on the last virtual stage). ``base``: (state.key data,
  state.step) for functions that take a key (``PipelineConfig.micro_key``), else None."""
  p, v = cfg.schedule.num_stages, cfg.schedule.repeats
  d = jax.lax.axis_index(cfg.axis)
  working = i >= 0
  key = cfg.micro_key(base, i)
  c = jax.tree.leaves(params["stages"])[0].shape[0] // v
  first_layer = jnp.asarray(cfg.schedule.stage_ids)[d, lap] * c  # its index in model order
  x = jax.lax.cond(working & (d == 0) & (lap == 0), lambda: cfg.input_fn(params, pick(i)), lambda: received)
  # A stage evaluated on zeros may have an infinite derivative there, and an idle tick's zero cotangent
  # times that is NaN: the gates give the weights and the input exact zeros there (a select, not a
  # product). Not a lax.cond: under jax.grad its saved values are outputs of the loop body (a copy of the
  # weights per tick), and under jax.checkpoint a tick's activations were kept twice.
  y = jax.lax.select_n(working, zero_x, run_stage(cfg, gate(working, params["stages"]), lap, gate(working, x), key,
                                                  first_layer))

  def add_head(params, y, loss, aux):
    loss_i, aux_i = cfg.head(params, y, pick(i), key)
    return loss + loss_i.astype(loss.dtype), add_sums(aux, aux_i)

  done = working & (d == p - 1) & (lap == v - 1)
  loss, aux = jax.lax.cond(done, add_head, lambda params, y, loss, aux: (loss, aux), params, y, loss, aux)
  return y, loss, aux


def local_loss(cfg: PipelineConfig, params: Params, batch: Batch, base: tuple | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, Any]]:
  """This device's share of the mean loss (non-zero on the last device only), with (busy ticks, aux).

  params["stages"]: [v c, ...] this device's layers, other entries whole; batch: [B / data replicas, ...].
  """
  sched = cfg.schedule
  d = jax.lax.axis_index(cfg.axis)
  pick = micro_batches(batch, sched.microbatches)
  x_type = activation_type(cfg, params, pick(0))
  zero_x = cfg.varying(jnp.zeros(x_type.shape, x_type.dtype))  # x: [mb, ...]
  # jax.checkpoint keeps its inputs (the params, loop constants) as they are, and the policy recomputes
  # what depends on the weights alone in the backward instead of saving it once per tick (m v + p - 1
  # copies); activations are saved as without it, or as cfg.remat says.
  compute = jax.checkpoint(lambda *args: tick_compute(cfg, pick, zero_x, base, *args),
                           policy=tick_policy(params, cfg), prevent_cse=False)
  table, laps = jnp.asarray(sched.table), jnp.asarray(sched.lap)
  p = sched.num_stages

  def tick(carry, t):
    received, loss, aux, active = carry
    i = table[t, d]
    y, loss, aux = compute(params, received, i, laps[t, d], loss, aux)
    sent = jax.lax.ppermute(y, cfg.axis, [(j, (j + 1) % p) for j in range(p)])
    return (sent, loss, aux, active + (i >= 0).astype(jnp.int32)), None

  zero_aux = zero_sums(jax.eval_shape(lambda: cfg.head(params, zero_x, pick(0), cfg.micro_key(base, 0))[1]), cfg)
  init = (zero_x, cfg.varying(jnp.zeros(())), zero_aux, cfg.varying(jnp.zeros((), jnp.int32)))
  (_, loss, aux, active), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks))
  m = sched.microbatches
  return loss / m, (active, jax.tree.map(lambda a: a / m, aux))


def local_grads(cfg: PipelineConfig, params: Params, batch: Batch, base: tuple | None = None
                ) -> tuple[jax.Array, Any, Params, jax.Array]:
  """``(loss, aux, grads, busy ticks)`` on this device: ``jax.grad`` of ``local_loss`` runs the ticks
  backwards (the reverse ``ppermute`` carries the activation gradients) and sums the micro-batches'."""
  (loss, (active, aux)), grads = jax.value_and_grad(lambda prm: local_loss(cfg, prm, batch, base),
                                                    has_aux=True)(params)
  return loss, aux, grads, active
