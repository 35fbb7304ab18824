"""Who delivers in a tick, and the SSP gate on reads: who may pull and start a gradient after it.

Clocks: ``clock[w]`` counts the gradients worker ``w`` has delivered, so the gradient it computes (or waits
to compute) carries timestamp ``clock[w]``. The gate holds no gradient back: everything a delay model
finishes is delivered in its tick. It holds *reads*: after the server's update, a worker with no gradient in
progress (it just delivered, or it waits) pulls and starts its next gradient only if

    clock[w] - min(clock of the alive workers) <= s,

so every update of timestamp ``<= clock[w] - s - 1`` of every alive worker is in what it reads. Otherwise it
waits, computing nothing, and pulls in the tick the slowest worker catches up (or fails). The slowest alive
worker always passes, so the run never deadlocks.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdist.strategies.async_sgd._config import NEVER, AsyncConfig


class Deliveries(NamedTuple):
  """One tick's schedule: ``alive``, the workers that compute, and those that deliver (all bool[N])."""

  alive: jax.Array
  computing: jax.Array
  deliver: jax.Array
  delay_state: Any


def deliveries(cfg: AsyncConfig, alive: jax.Array, waiting: jax.Array, delay_state: Any, key: jax.Array,
               tick: jax.Array) -> Deliveries:
  """Failures, then the delay model (pauses included) over the workers that compute at ``tick``.

  A worker is alive while ``tick < cfg.fail[w]``; it computes if it is alive and does not wait at the gate;
  it delivers the gradient it finishes, always (no finished gradient is held back).
  """
  alive = alive & (tick < jnp.asarray(cfg.fail, jnp.int32))
  computing = alive & ~waiting
  finished, delay_state = cfg.delay.finish(delay_state, key, tick, computing)
  return Deliveries(alive, computing, jnp.asarray(finished).astype(bool) & computing, delay_state)


def slowest_clock(clock: jax.Array, alive: jax.Array) -> jax.Array:
  """The smallest clock of the alive workers (``NEVER`` when none is alive)."""
  return jnp.min(jnp.where(alive, clock, NEVER))


def gate(clock: jax.Array, alive: jax.Array, idle: jax.Array, max_staleness: int | None) -> tuple[jax.Array, jax.Array]:
  """The SSP read gate, after a tick's deliveries: which idle workers pull now, and which wait.

  Args:
    clock: int32[N], gradients delivered by each worker, this tick's included.
    alive: bool[N].
    idle: bool[N], alive workers with no gradient in progress (they delivered this tick, or were waiting).
    max_staleness: s, or None (no bound: every idle worker pulls).

  Returns:
    ``(pull, waiting)``, bool[N] each: ``pull`` the idle workers with ``clock - slowest <= s``, ``waiting`` the rest.
  """
  if max_staleness is None:
    return idle, jnp.zeros_like(idle)
  ok = clock - slowest_clock(clock, alive) <= max_staleness
  return idle & ok, idle & ~ok
