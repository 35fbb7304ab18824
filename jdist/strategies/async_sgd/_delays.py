"""Delay models: when a computing worker finishes its gradient. Random pauses are one of them.

A delay model is a pair of pure functions (like an optax transformation). Time on a gradient passes only
while a worker computes: a worker waiting at the SSP gate, or pausing, spends none, so a model with a
clock of its own (``fixed_speeds``, ``uniform``) counts only the ticks its worker computed.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdist._checks import check_positive_int
from jdist._types import PyTree
from jdist.errors import OptionError, OptionTypeError


class DelayModel(NamedTuple):
  """When each worker finishes a gradient, as a pair of pure functions.

  Attributes:
    init: ``init(key, num_workers) -> delay_state``; raises ``ValueError`` if the model does not fit
      ``num_workers``.
    finish: ``finish(delay_state, key, tick, computing) -> (bool[num_workers], delay_state)``: which workers
      finish a gradient at ``tick`` (an int32 scalar). ``computing`` (bool[num_workers]) marks the workers
      that compute this tick; a worker that does not (it waits at the SSP gate, or pauses) finishes nothing,
      and a model that counts time counts none for it.
    name: a short name for logs.
  """

  init: Callable[[jax.Array, int], PyTree]
  finish: Callable[[PyTree, jax.Array, jax.Array, jax.Array], tuple[jax.Array, PyTree]]
  name: str


def real_number(value: Any, what: str) -> float:
  """``value`` as a float: a Python or numpy real number, or a 0-d integer or floating array (not a bool).

  Raises:
    OptionTypeError: ``value`` is a bool or not a real number.
  """
  scalar_array = (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
                  and (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)))
  if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Real) or scalar_array):
    raise OptionTypeError(what, value, "a real number", "Pass a float or an int (a numpy or 0-d JAX number works too).")
  return float(value)


def every_tick() -> DelayModel:
  """Every computing worker finishes a gradient every tick (no delays)."""
  return DelayModel(lambda key, n: (), lambda state, key, tick, computing: (computing, state), "every_tick")


def fixed_speeds(periods: Sequence[int]) -> DelayModel:
  """Worker ``w`` finishes a gradient after ``periods[w]`` ticks of computing it.

  Without pauses or waits that is every tick ``t`` with ``(t + 1) % periods[w] == 0``. The delay state
  holds each worker's ticks spent on its current gradient (int32[num_workers]).

  Args:
    periods: one positive int per worker; 1 is a worker that delivers every tick it computes.

  Example:
    >>> model = fixed_speeds([1, 2, 4])  # worker 0 every tick, 1 every 2nd, 2 every 4th
  """
  periods = tuple(check_positive_int(p, "each period of fixed_speeds") for p in periods)
  if not periods:
    raise OptionError("fixed_speeds(periods)", periods, "one period per worker")

  def init(key, n):
    if len(periods) != n:
      raise OptionError("fixed_speeds(periods)", periods, f"one period per worker, {n} of them")
    return jnp.zeros((n,), jnp.int32)

  def finish(spent, key, tick, computing):
    spent = spent + computing.astype(jnp.int32)
    done = computing & (spent >= jnp.asarray(periods, jnp.int32))
    return done, jnp.where(done, 0, spent)

  return DelayModel(init, finish, f"fixed_speeds{periods}")


def geometric(p: float) -> DelayModel:
  """Each computing worker finishes each tick independently with probability ``p``: compute times are
  geometric with mean ``1 / p`` ticks (memoryless, the classic model of asynchronous SGD analyses).

  Args:
    p: the per-tick probability, in (0, 1]: a real number (Python, numpy or a 0-d array).

  Raises:
    OptionTypeError: ``p`` is not a real number. OptionError: ``p`` outside (0, 1].
  """
  p = real_number(p, "geometric(p)")
  if not 0 < p <= 1:
    raise OptionError("geometric(p)", p, "a probability in (0, 1]", "Use 1 for a worker that finishes every tick.")

  def finish(state, key, tick, computing):
    return computing & (jax.random.uniform(key, computing.shape) < p), state

  return DelayModel(lambda key, n: (), finish, f"geometric({p:g})")


def uniform(low: int, high: int) -> DelayModel:
  """Each gradient takes a whole number of computing ticks drawn uniformly from ``{low, ..., high}``.

  The delay state holds each worker's remaining ticks (int32[num_workers]); when it reaches zero the
  worker finishes and draws the time of its next gradient.

  Args:
    low: the shortest compute time, >= 1 tick.
    high: the longest, >= low.
  """
  low = check_positive_int(low, "uniform(low, high): low")
  high = check_positive_int(high, "uniform(low, high): high")
  if high < low:
    raise OptionError("uniform(low, high): high", high, f"an int >= low ({low})")

  def init(key, n):
    return jax.random.randint(key, (n,), low, high + 1, dtype=jnp.int32)

  def finish(remaining, key, tick, computing):
    remaining = remaining - computing.astype(jnp.int32)
    done = computing & (remaining <= 0)
    fresh = jax.random.randint(key, computing.shape, low, high + 1, dtype=jnp.int32)
    return done, jnp.where(done, fresh, remaining)

  return DelayModel(init, finish, f"uniform({low},{high})")


def pauses(p: float, inner: DelayModel | None = None) -> DelayModel:
  """The article's random pauses: each tick each worker pauses with probability ``p`` (independently per
  worker and tick) and computes nothing; the ticks it computes run ``inner`` (default: ``every_tick``).

  ``pauses(p)`` alone is ``geometric(1 - p)``, drawn differently. ``async_sgd(pause_prob=p, delay=d)`` is
  ``pauses(p, d)``.

  Raises:
    OptionTypeError: ``p`` is not a real number. OptionError: ``p`` outside [0, 1).
  """
  p = real_number(p, "pause_prob")
  if not 0 <= p < 1:
    raise OptionError("pause_prob", p, "a probability in [0, 1)", "Use 0 for no pauses; 1 would stop every worker "
                      "forever.")
  inner = every_tick() if inner is None else inner

  def finish(state, key, tick, computing):
    k_pause, k_inner = jax.random.split(key)
    working = computing & (jax.random.uniform(k_pause, computing.shape) >= p)
    done, state = inner.finish(state, k_inner, tick, working)
    return jnp.asarray(done).astype(bool) & working, state

  return DelayModel(inner.init, finish, f"pauses({p:g}, {inner.name})")


def as_delay_model(delay: Any) -> DelayModel:
  """``delay`` as a ``DelayModel``: None is ``every_tick()``; a plain pure function ``delay(key, tick,
  num_workers) -> bool[num_workers]`` is a stateless model (its mask counts only for computing workers)."""
  if delay is None:
    return every_tick()
  if isinstance(delay, DelayModel):
    return delay
  if callable(delay):
    name = getattr(delay, "__name__", type(delay).__name__)
    return DelayModel(lambda key, n: (), lambda s, key, tick, computing: (delay(key, tick, computing.shape[0]), s),
                      name)
  raise OptionTypeError("delay", delay, "None, a DelayModel (fixed_speeds, geometric, uniform, pauses) or a "
                        "function delay(key, tick, num_workers) -> bool mask")


def check_delay_model(model: DelayModel, n: int) -> None:
  """Traces ``model`` once for ``n`` workers (``jax.eval_shape``: nothing runs).

  Raises:
    ValueError: ``init`` does not fit ``n`` workers (the model's own error), ``finish`` returns a mask
      that is not ``[n]``, or a delay state unlike the one ``init`` gives.
    TypeError: ``finish`` does not return ``(mask, state)``, or the mask is not bool (or integer).
  """
  key = jax.random.key(0)
  state = jax.eval_shape(lambda k: model.init(k, n), key)
  computing = jax.ShapeDtypeStruct((n,), jnp.bool_)
  out = jax.eval_shape(model.finish, state, key, jax.ShapeDtypeStruct((), jnp.int32), computing)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(f"The delay model {model.name}'s finish must return (mask, delay_state), got "
                    f"{type(out).__name__}.")
  mask, new_state = out
  if not hasattr(mask, "shape") or mask.shape != (n,):
    raise ValueError(f"The delay {model.name} gave a mask of shape {getattr(mask, 'shape', type(mask).__name__)} "
                     f"for num_workers={n}; it must be bool[{n}], one entry per worker (True: the worker "
                     f"finishes a gradient this tick). Build it from num_workers, e.g. "
                     f"jnp.arange(num_workers) == tick % num_workers.")
  if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise TypeError(f"The delay {model.name} gave a mask of dtype {mask.dtype}; it must be bool[{n}] (an integer "
                    f"mask counts nonzero as True). Return a comparison, e.g. jax.random.uniform(key, (n,)) < p.")
  spec = lambda tree: (jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])
  if spec(new_state) != spec(state):
    raise ValueError(f"The delay model {model.name}'s finish returned the delay state {new_state}, but init gave "
                     f"{state}; finish must return a state of the same structure, shapes and dtypes.")
