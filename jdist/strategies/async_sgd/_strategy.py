"""Asynchronous SGD, emulated exactly: a parameter server, stale workers, pauses and bounded staleness.

A real parameter server cannot be studied reproducibly: who delivers when depends on the machine. Here
the whole schedule is drawn from the key in the state, so a run is a pure function of (state, batches)
and is repeated bit for bit. One ``step`` is one server tick; every worker computes a gradient each
tick on the copy of the parameters it last pulled (``jax.vmap`` over its workers on each device of a
``workers`` mesh axis), and a mask says which gradients reach the server.

One tick ``t`` (``t = state.step`` before the tick), in this order:

1. **Failures.** Worker ``w`` is alive while ``t < fail[w]``; from its failure tick on it never
   delivers again, and it no longer counts for the staleness bound.
2. **Finishing.** An alive worker finishes a gradient this tick if the delay model says so (default:
   every tick) and it does not pause (probability ``pause_prob``, drawn independently per worker and
   tick: the article's random pause). A worker that finished earlier but was held back by the bound
   (``pending``) is ready again without a new draw: it keeps its work and only waits.
3. **Bounded staleness (SSP).** ``clock[w]`` counts the gradients ``w`` has delivered. With
   ``max_staleness=s`` the delivering set is the largest subset of the ready workers that keeps
   ``max(clock) - min(clock) <= s`` over the alive workers after the tick; the others stay pending. With
   ``s = 0`` a tick delivers either every alive worker or none: synchronous SGD that waits for the
   slowest.
4. **Gradients.** Every worker's loss and gradient on its own copy and its slice ``batch[w]`` of this
   tick's batch (a pending worker recomputes on the new slice; its copy, hence the point the gradient
   is taken at, is unchanged). Gradients of workers that do not deliver are discarded.
5. **Server update.** *A tick in which every live worker delivers gradients computed on the current
   server version is a synchronous round: the gradients are averaged and applied once.* Otherwise the
   delivered gradients are applied one by one in worker order, each as its own optimizer update at the
   full learning rate (standard asynchronous SGD). The staleness of a gradient is the number of server
   updates between its worker's pull and its application, ``version - pulled_version[w]`` (earlier
   workers of the same tick count). ``delay_compensation=lam`` replaces the gradient with DC-ASGD's
   ``g + lam * g * g * (w_server - w_pulled)`` (Zheng et al. 2017); ``staleness_lr="inverse"`` scales
   the optimizer's update by ``1 / max(1, staleness)`` (Zhang et al. 2016). Both leave a synchronous
   round unchanged (staleness 0, ``w_server == w_pulled``).
6. **Pull.** Each worker that delivered copies the server parameters as they are after the tick, with
   their version, and its clock advances by one.

So with no pauses and no delays every tick is a synchronous round and equals one ``data_parallel``
step on the union of the workers' batches (tested to 1e-5).

What the staleness bound bounds: SSP bounds *clocks*. The ``clock_staleness`` of a gradient delivered
at clock ``c`` is ``c - m``, where ``m`` was the slowest alive worker's clock when its worker pulled:
all updates of clocks ``< m`` of every worker are in the parameters the gradient was taken at. SSP
guarantees ``clock_staleness <= s`` (Ho et al. 2013). Counted in server updates, a gradient can miss
more, up to ``(num_workers - 1) * (2s + 1)``: each other worker may have advanced ``2s + 1`` clocks
between the pull and the push.

Delay models decide when a worker finishes; see ``fixed_speeds``, ``geometric`` and ``uniform``. Any
pure function ``delay(key, tick, num_workers) -> bool[num_workers]`` works too.

Layout, as a parameter server shards its variables over its server tasks: the workers' copies and
batches are split over the mesh's ``workers`` axis, ``N/D`` workers per device, and so is the server.
Each leaf of the server's parameters and optimizer state is split over the same axis on its first
dimension that divides by ``D`` (leaves under 1024 elements stay whole on every device, as under
FSDP). A tick is three parts:

* the workers (one ``shard_map``): each device computes the gradients of its workers (``vmap``) and
  sends each device the pieces of every gradient that its part of the server holds (one all-to-all:
  a device sends ``(D-1)/D`` of its workers' gradients);
* the server: the updates run on the pieces, each device updating its own (``jit`` partitions the
  optimizer, so one that looks across a leaf or across all leaves, such as adafactor or a global-norm
  clip, computes what one device computes). They are a single loop with a data-dependent trip count,
  so the server state is updated in place;
* the pull: the parameters' pieces are all-gathered and the workers that delivered copy them.

With one worker per device a tick therefore sends what a ring all-reduce sends, ``2(D-1)/D`` of the
parameters' bytes per device, whatever the number of updates it applies, and each device runs ``1/D``
of each update. ``run`` scans ticks inside one jitted call.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._checks import (
  check_callable,
  check_optimizer,
  check_params,
  check_positive_int,
)
from jdist._types import Batch, LossFn, Metrics, Params, PRNGKey, PyTree
from jdist.state import TrainState
from jdist.strategies.model_parallel import DEFAULT_FSDP_MIN_SIZE
from jdist.strategy import (
  StepFn,
  Strategy,
  metrics_from,
  optimizer_update,
  pin_layout,
  raw_key,
  value_and_grad,
)

STALENESS_LR = ("inverse",)
_NEVER = np.iinfo(np.int32).max  # the failure tick of a worker that never fails


def _real(value: Any, what: str) -> float:
  """``value`` as a float: a Python or numpy real number, or a 0-d integer or floating array (not a bool).

  Raises:
    TypeError: ``value`` is a bool or not a real number.
  """
  scalar_array = (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0
                  and (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)))
  if isinstance(value, (bool, np.bool_)) or not (isinstance(value, numbers.Real) or scalar_array):
    raise TypeError(f"{what} must be a real number, got {value!r} ({type(value).__name__}). Pass a float or an "
                    f"int (a numpy or 0-d JAX number works too).")
  return float(value)


# ----------------------------------------------------------------------------------------------------
# Delay models


class DelayModel(NamedTuple):
  """When each worker finishes a gradient, as a pair of pure functions (like an optax transformation).

  Attributes:
    init: ``init(key, num_workers) -> delay_state``; raises ``ValueError`` if the model does not fit
      ``num_workers``.
    finish: ``finish(delay_state, key, tick, num_workers) -> (bool[num_workers], delay_state)``, the
      workers that finish a gradient at ``tick`` (an int32 scalar).
    name: a short name for logs.
  """

  init: Callable[[jax.Array, int], PyTree]
  finish: Callable[[PyTree, jax.Array, jax.Array, int], tuple[jax.Array, PyTree]]
  name: str


def every_tick() -> DelayModel:
  """Every worker finishes a gradient every tick (no delays)."""
  return DelayModel(init=lambda key, n: (), finish=lambda s, key, tick, n: (jnp.ones((n,), bool), s),
                    name="every_tick")


def fixed_speeds(periods: Sequence[int]) -> DelayModel:
  """Worker ``w`` finishes every ``periods[w]`` ticks: at ticks ``t`` with ``(t + 1) % periods[w] == 0``.

  Args:
    periods: one positive int per worker; 1 is a worker that delivers every tick.

  Example:
    >>> model = fixed_speeds([1, 2, 4])  # worker 0 every tick, 1 every 2nd, 2 every 4th
  """
  periods = [check_positive_int(p, "each period of fixed_speeds") for p in periods]
  if not periods:
    raise ValueError("fixed_speeds needs one period per worker, got an empty list.")

  def init(key, n):
    if len(periods) != n:
      raise ValueError(f"fixed_speeds got {len(periods)} periods but there are {n} workers; give one period "
                       f"per worker.")
    return ()

  def finish(state, key, tick, n):
    return (tick + 1) % jnp.asarray(periods, jnp.int32) == 0, state

  return DelayModel(init, finish, f"fixed_speeds{tuple(periods)}")


def geometric(p: float) -> DelayModel:
  """Each worker finishes each tick independently with probability ``p``: compute times are geometric
  with mean ``1 / p`` ticks (memoryless, the classic model of asynchronous SGD analyses).

  Args:
    p: the per-tick probability, in (0, 1]: a real number (Python, numpy or a 0-d array).

  Raises:
    TypeError: ``p`` is not a real number. ValueError: ``p`` outside (0, 1].
  """
  p = _real(p, "geometric(p)")
  if not 0 < p <= 1:
    raise ValueError(f"geometric(p) needs a probability in (0, 1], got {p!r}. Use 1 for a worker that finishes "
                     f"every tick.")

  def finish(state, key, tick, n):
    return jax.random.uniform(key, (n,)) < p, state

  return DelayModel(lambda key, n: (), finish, f"geometric({p:g})")


def uniform(low: int, high: int) -> DelayModel:
  """Each gradient takes a whole number of ticks drawn uniformly from ``{low, ..., high}``.

  The delay state holds each worker's remaining ticks (int32[num_workers]); when it reaches zero the
  worker finishes and draws the time of its next gradient. (Time runs on while a finished worker waits
  under ``max_staleness``: it is taken to start its next gradient at once.)

  Args:
    low: the shortest compute time, >= 1 tick.
    high: the longest, >= low.
  """
  low = check_positive_int(low, "uniform(low, high): low")
  high = check_positive_int(high, "uniform(low, high): high")
  if high < low:
    raise ValueError(f"uniform(low, high) needs low <= high, got low={low}, high={high}.")

  def init(key, n):
    return jax.random.randint(key, (n,), low, high + 1, dtype=jnp.int32)

  def finish(remaining, key, tick, n):
    remaining = remaining - 1
    done = remaining <= 0
    fresh = jax.random.randint(key, (n,), low, high + 1, dtype=jnp.int32)
    return done, jnp.where(done, fresh, remaining)

  return DelayModel(init, finish, f"uniform({low},{high})")


def _as_delay_model(delay: Any) -> DelayModel:
  if delay is None:
    return every_tick()
  if isinstance(delay, DelayModel):
    return delay
  if callable(delay):  # a stateless ``delay(key, tick, num_workers) -> bool mask``
    name = getattr(delay, "__name__", type(delay).__name__)
    return DelayModel(lambda key, n: (), lambda s, key, tick, n: (jnp.asarray(delay(key, tick, n)), s), name)
  raise TypeError(f"delay must be None, a DelayModel (fixed_speeds, geometric, uniform) or a function "
                  f"delay(key, tick, num_workers) -> bool mask, got {type(delay).__name__}.")


def _check_delay_model(model: DelayModel, n: int, key_data: jax.Array) -> None:
  """Traces ``model`` once for ``n`` workers (``jax.eval_shape``: nothing runs).

  Raises:
    ValueError: ``init`` does not fit ``n`` workers (the model's own error), ``finish`` returns a mask
      that is not ``[n]``, or a delay state unlike the one ``init`` gives.
    TypeError: ``finish`` does not return ``(mask, state)``, or the mask is not bool (or integer).
  """
  key = jax.random.wrap_key_data(key_data)
  state = jax.eval_shape(lambda k: model.init(k, n), key)
  out = jax.eval_shape(lambda s, k, t: model.finish(s, k, t, n), state, key, jax.ShapeDtypeStruct((), jnp.int32))
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


# ----------------------------------------------------------------------------------------------------
# The strategy


def _masked_sum(mask: jax.Array, x: jax.Array) -> jax.Array:
  """``sum_i x[i]`` over the ``i`` with ``mask[i]`` (bool), along the leading axis of ``x``.

  The other slices are selected away, not multiplied by 0: a NaN or inf in the gradient or loss of a
  worker that does not count (failed, or not delivering) must not reach the sum (``0 * nan`` is nan).

  Written as an unrolled sum of slices (one elementwise fusion) for the few workers a device holds:
  XLA:CPU reduces a leading axis of 8 x 0.9M floats ~20x slower (measured), and a contraction picks
  transposed layouts that slow the optimizer update that follows.
  """
  zero = jnp.zeros((), x.dtype)
  if x.shape[0] > 32:
    kept = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, zero)
    return jnp.tensordot(jnp.ones(mask.shape, x.dtype), kept, axes=1)
  total = jnp.where(mask[0], x[0], zero)
  for i in range(1, x.shape[0]):
    total = total + jnp.where(mask[i], x[i], zero)
  return total


class AsyncStrategy(Strategy):
  """A ``Strategy`` with one more pure function, ``run(state, batches, ticks) -> (state, metrics)``.

  ``run`` scans ``ticks`` server ticks in one jitted call; the ``i``-th tick of the call uses
  ``batches[i % T]`` where ``batches`` leaves are ``[T, num_workers, b, ...]``. Metrics come back
  stacked, leading axis ``ticks``. ``state`` is donated, as with ``step``.
  """

  def __new__(cls, *fields: Any, run: Callable[..., tuple[TrainState, Metrics]], **kw: Any):
    self = super().__new__(cls, *fields, **kw)
    self.run = run
    return self

  def _replace(self, **changes: Any) -> "AsyncStrategy":
    return AsyncStrategy(*Strategy(*self)._replace(**changes), run=self.run)


def split_workers(batch: Batch, num_workers: int, *, process_count: int | None = None) -> Batch:
  """Reshapes a batch of ``num_workers * b`` examples to ``[num_workers, b, ...]``, the layout ``async_sgd``
  takes (worker ``w`` gets examples ``w*b .. (w+1)*b - 1``), e.g. for ``ArrayLoader`` data.

  In a multi-process run each process holds only its share of the global batch (``ArrayLoader`` yields
  rows ``[p * B/P, (p + 1) * B/P)`` in process ``p``), which is exactly the data of workers
  ``p * N/P .. (p + 1) * N/P - 1``; so the share is split into this process's ``num_workers / P`` workers,
  the slices ``async_sgd``'s ``shard_batch`` takes there. The union over processes, in process order, is
  what one process gets from the global batch.

  Args:
    batch: a pytree of arrays sharing the leading (example) axis: the global batch in one process, this
      process's share in a multi-process run.
    num_workers: N, all the workers of the run.
    process_count: P, by default ``jax.process_count()``; N must be a multiple of it.

  Returns:
    The batch with leaves ``[N / P, b, ...]`` (numpy arrays).

  Raises:
    ValueError: N not a multiple of P, or a batch size not a multiple of N / P.

  Example:
    >>> split_workers({"x": np.zeros((8, 3))}, 4)["x"].shape
    (4, 2, 3)
  """
  n = check_positive_int(num_workers, "num_workers")
  count = check_positive_int(jax.process_count() if process_count is None else process_count, "process_count")
  if n % count:
    raise ValueError(f"num_workers ({n}) is not divisible by the {count} processes; each process runs the same "
                     f"number of workers. Use a multiple of {count} workers.")
  local = n // count
  what = "batch" if count == 1 else "process-local batch"
  size = batch_lib.batch_size(batch, what=what)
  if size % local:
    workers = (f"num_workers={n}" if count == 1
               else f"this process's {local} workers (num_workers={n} / {count} processes)")
    raise ValueError(
        f"split_workers: the {what} has {size} examples, which do not split evenly over {workers}: every worker "
        f"gets the same number b of examples. Use a {what} of a multiple of {local} examples, e.g. "
        f"{max(local, size - size % local)}, or a number of workers that divides it.")
  return jax.tree.map(lambda x: np.asarray(x).reshape(local, x.shape[0] // local, *x.shape[1:]), batch)


def _process_local(batch: Batch) -> bool:
  """Whether ``batch`` is this process's part (host data in a multi-process run), not global arrays."""
  return jax.process_count() > 1 and not any(isinstance(x, jax.Array) and not x.is_fully_addressable
                                             for x in jax.tree.leaves(batch))


def _check_worker_axis(batch: Batch, n: int, *, dim: int, what: str, process_local: bool = False) -> None:
  """Checks axis ``dim`` of every leaf is the workers: all ``n`` of them, or with ``process_local`` the
  ``n / P`` workers of this process (a multi-process run, where each process passes its own workers);
  and that the leaves with examples agree on the per-worker batch size ``b`` at axis ``dim + 1``."""
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  if not leaves:
    raise ValueError(f"The {what} is empty; expected a pytree of arrays.")
  count = jax.process_count() if process_local else 1
  local = n // count
  workers = "num_workers" if count == 1 else "num_workers / processes"
  layout = f"[{workers}, b, ...]" if dim == 0 else f"[T, {workers}, b, ...]"
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path) or "<root>"
    if len(shape) <= dim or shape[dim] != local:
      got = f"shape {shape}" if len(shape) <= dim else f"axis {dim} of size {shape[dim]} (shape {shape})"
      if count == 1:
        raise ValueError(
            f"async_sgd: {what} leaf {name} has {got}, but num_workers is {n}: each leaf must be {layout}, "
            f"worker w's examples at index w. Split a global batch of {n}*b examples with "
            f"jdist.split_workers(batch, {n}).")
      raise ValueError(
          f"async_sgd: process {jax.process_index()}'s {what} leaf {name} has {got}, but in a run of {count} "
          f"processes each passes only the slices of its own {local} of the {n} workers: each leaf must be "
          f"{layout}, {local} at axis {dim}. Split this process's share of the global batch with "
          f"jdist.split_workers(batch, {n}).")
    if len(shape) > dim + 1:  # a leaf of the workers alone is one value per worker, with no examples
      sizes[name] = shape[dim + 1]
  if len(set(sizes.values())) > 1:
    listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(
        f"async_sgd: {what} leaves have different per-worker batch sizes b at axis {dim + 1} ({listing}); every "
        f"leaf must be {layout} with the same b, worker w's b examples at index w. Split a global batch whose "
        f"leaves all hold the same number of examples with jdist.split_workers(batch, {n}).")
  if 0 in sizes.values():  # the mean loss of no examples is nan, and the server would still apply it
    raise ValueError(f"async_sgd: the {what} give(s) each worker no examples (b = 0 at axis {dim + 1}); each leaf must "
                     f"be {layout} with b >= 1.")


def async_sgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_workers: int,
    mesh: Mesh | None = None,
    max_staleness: int | None = None,
    pause_prob: float = 0.0,
    delay: DelayModel | Callable[..., jax.Array] | None = None,
    staleness_lr: Literal["inverse"] | None = None,
    delay_compensation: float = 0.0,
    fail: dict[int, int] | None = None,
    has_aux: bool = False,
    axis: str = "workers",
    key: PRNGKey | int,
) -> AsyncStrategy:
  """Asynchronous SGD on an emulated parameter server; one ``step`` is one server tick.

  The rules of a tick are in this module's docstring. In short: each tick every alive worker may
  deliver the gradient of its stale copy (pauses, delay model, ``max_staleness``); the server applies
  the delivered gradients one by one in worker order, or averaged once when every live worker delivers
  with zero staleness (a synchronous round); the workers that delivered pull the new parameters.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (``(loss, aux)`` with ``has_aux``).
    optimizer: any ``optax.GradientTransformation``, the server's.
    num_workers: N, the number of emulated workers (>= 1).
    mesh: where the workers run. Worker copies and batches are split over its ``axis`` (``num_workers``
      must be divisible by its size); the server's state is split over it too. None: one device,
      ``jax.devices()[0]`` (one process only). In a multi-process run ``axis`` must run across the
      processes in process order (``jdist.make_mesh(workers=-1)`` does), so that process ``p`` holds
      workers ``p * N/P .. (p + 1) * N/P - 1``.
    max_staleness: None (fully asynchronous) or s >= 0: Stale Synchronous Parallel, the clock spread
      of the alive workers never exceeds s; s = 0 is synchronous SGD.
    pause_prob: each tick each worker pauses (finishes nothing) with this probability, in [0, 1).
    delay: None (every worker finishes every tick), a ``DelayModel`` (``fixed_speeds``, ``geometric``,
      ``uniform``) or a pure function ``delay(key, tick, num_workers) -> bool[num_workers]`` (an integer
      mask counts nonzero as True). Traced once here to check the mask's shape and dtype.
    staleness_lr: None, or ``"inverse"``: each update scaled by ``1 / max(1, staleness)``.
    delay_compensation: lam >= 0 for DC-ASGD's ``g + lam * g * g * (w_server - w_pulled)``; 0 is off.
    fail: ``{worker: tick}``: the worker delivers nothing from that tick on (0: never runs).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis: the mesh axis the workers are split over: one name (several axes are a ``ValueError``).
    key: the seed of the schedule (pauses, delays): a JAX key, its raw uint32 key data or an int.
      ``init(params, key=...)`` overrides it.

  Returns:
    An ``AsyncStrategy``: ``init(params, *, key=None)``, ``shard_batch(batch)``, ``step(state, batch)``
    with batch leaves ``[num_workers, b, ...]``, and ``run(state, batches, ticks)``.

    Batches in a multi-process run (P processes): each process passes to ``shard_batch`` only the
    slices of its own workers, leaves ``[N/P, b, ...]`` for workers ``p * N/P .. (p + 1) * N/P - 1``
    (``run``: ``[T, N/P, b, ...]``), and the global ``[N, b, ...]`` batch is assembled from them with no
    communication. That is ``split_workers(share, N)`` of the process's share of the global batch (what
    ``ArrayLoader`` yields there), so the run equals one process given ``split_workers(global, N)``.

    ``state.params`` / ``state.opt_state``: the server's, split over ``axis`` (see the module docstring).
    ``state.step``: ticks run.
    ``state.key``: raw uint32 key data, split every tick. ``state.extra``:
    ``worker_params`` (each leaf ``[N, ...]``, split over ``axis``), ``pulled_version`` int32[N],
    ``clock`` int32[N] (gradients delivered), ``alive`` bool[N], ``pending`` bool[N] (finished, held
    back by the bound), ``pulled_clock`` int32[N] (slowest alive clock at each worker's pull),
    ``version`` int32 (server updates applied) and ``delay`` (the delay model's state).

    Metrics per tick: ``loss`` (mean over alive workers of each one's loss on its own copy and batch
    slice; over all workers if none is alive), ``grad_norm`` (of the mean delivered gradient; 0 if
    none), ``step``; per worker ``delivered`` f32[N] (0/1), ``staleness`` int32[N] and
    ``clock_staleness`` int32[N] (-1 where not delivered); scalars ``num_delivered``,
    ``max_staleness``, ``mean_staleness``, ``max_clock_staleness`` (0 when nothing is delivered),
    ``clock_spread`` (alive workers), ``num_alive``, ``version`` and ``sync_round`` (1 when the tick
    was a synchronous round).

  Raises:
    TypeError: pause_prob or delay_compensation not a real number (Python, numpy or 0-d array; not a
      bool), axis not a mesh axis name, key not a JAX key, raw uint32 key data or an int seed, a delay
      mask that is not bool (or integer).
    ValueError: num_workers < 1, pause_prob outside [0, 1), a negative max_staleness, an unknown
      staleness_lr, a negative delay_compensation, ``fail`` naming a worker outside [0, num_workers) or
      a negative tick, axis naming several mesh axes, num_workers not divisible by the mesh axis, a
      delay model for another number of workers or a delay mask that is not [num_workers]; at
      ``shard_batch`` / ``step`` / ``run``, batch leaves whose worker axis is not num_workers or that
      disagree on the per-worker batch size b (a leaf of the workers alone, one value each, has no b).

  Example:
    >>> strategy = async_sgd(linear.loss, optax.sgd(0.01), num_workers=4, pause_prob=0.05, key=0)  # doctest: +SKIP
    >>> state = strategy.init(linear.init())                                                 # doctest: +SKIP
    >>> state, metrics = strategy.run(state, split_workers(data, 4)[None], 3000)             # doctest: +SKIP
  """
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
    raise ValueError(f"num_workers must be a positive int (the number of emulated workers), got {num_workers!r}.")
  n = int(num_workers)
  axis = checks.one_axis(axis, who="async_sgd's workers axis", example="workers")
  pause_prob = _real(pause_prob, "pause_prob")
  if not 0 <= pause_prob < 1:
    raise ValueError(f"pause_prob must be a probability in [0, 1), got {pause_prob!r}. Use 0 for no pauses; "
                     f"1 would stop every worker forever.")
  if max_staleness is not None:
    if not isinstance(max_staleness, (int, np.integer)) or isinstance(max_staleness, bool) or max_staleness < 0:
      raise ValueError(f"max_staleness must be None (no bound) or an int >= 0 (0 is synchronous), got "
                       f"{max_staleness!r}.")
    max_staleness = int(max_staleness)
  if staleness_lr is not None and staleness_lr not in STALENESS_LR:
    raise ValueError(f"Unknown staleness_lr: {staleness_lr!r}. It needs to be None or one of {list(STALENESS_LR)}.")
  lam = _real(delay_compensation, "delay_compensation")
  if not lam >= 0:
    raise ValueError(f"delay_compensation must be a number >= 0 (DC-ASGD's lambda; 0 is off), got {lam!r}.")
  fail_ticks = np.full((n,), _NEVER, np.int32)
  for w, t in (fail or {}).items():
    if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or not 0 <= w < n:
      raise ValueError(f"fail names worker {w!r}, but the workers are 0..{n - 1} (num_workers={n}).")
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 0:
      raise ValueError(f"fail[{w}] must be the tick (an int >= 0) from which worker {w} stops, got {t!r}.")
    fail_ticks[w] = min(int(t), _NEVER)
  delay_model = _as_delay_model(delay)
  base_key = raw_key(key)
  _check_delay_model(delay_model, n, base_key)  # fits n workers?

  if mesh is None:
    if jax.process_count() > 1:
      raise ValueError(
          f"async_sgd with mesh=None runs every worker on one device, jax.devices()[0], but this run has "
          f"{jax.process_count()} processes and every process's devices must take part. Pass a mesh over all "
          f"devices, e.g. mesh=jdist.make_mesh({axis}=-1) (num_workers a multiple of its size).")
    mesh = mesh_lib.make_mesh(**{axis: 1}, devices=jax.devices()[:1])
  axis = checks.check_axis(mesh, axis, who="async_sgd's workers axis", what="workers axis", example="workers")
  checks.check_no_idle_axes(mesh, (axis,), who="async_sgd", fix="Its workers run over one axis: put all the "
                              "devices on it")
  d = mesh.shape[axis]
  if n % d:
    raise ValueError(f"num_workers ({n}) is not divisible by the {d} devices on mesh axis {axis!r}. Use a "
                     f"multiple of {d} workers, or a mesh with an axis size that divides {n}, e.g. "
                     f"jdist.make_mesh({axis}={np.gcd(n, d)}, devices=jax.devices()[:{np.gcd(n, d)}]).")
  replicated = NamedSharding(mesh, P())
  per_worker = NamedSharding(mesh, P(axis))
  vg = value_and_grad(loss_fn, has_aux=has_aux)
  fail_arr = jnp.asarray(fail_ticks)

  k = n // d  # workers per device
  is_spec = lambda x: isinstance(x, P)
  split_dim = lambda spec: next((i for i, e in enumerate(spec) if e is not None), None)

  def server_specs(params):
    """The server state's layout: each leaf split over the workers axis on its first dimension that divides by
    the axis size, so that every piece is one contiguous block for the all-to-all and the all-gather (on 8 CPU
    devices the all-gather of the MLP benchmark's parameters took 2.1 ms so, 3.8 ms split on the largest
    dimension). Leaves under 1024 elements (as under FSDP) or with no such dimension stay whole everywhere."""

    def spec(leaf):
      shape = np.shape(leaf)
      dim = next((i for i, size in enumerate(shape) if size % d == 0), None)
      if d == 1 or dim is None or math.prod(shape) < DEFAULT_FSDP_MIN_SIZE:
        return P()
      return P(*([None] * dim), axis)

    return jax.tree.map(spec, params)


  def workers_fn(specs):
    """The workers' half of a tick, one ``shard_map`` over the workers axis: each device computes the losses and
    gradients of its k workers on their copies, and sends each worker's gradient to the server in pieces."""

    def to_server(x, spec):
      # x: [k, ...], this device's workers -> [N, ...], every worker's piece of the leaf that this device's part
      # of the server holds (an all-to-all); a leaf the server keeps whole comes from every device (all-gather)
      if d == 1:
        return x
      dim = split_dim(spec)
      if dim is None:
        return jax.lax.all_gather(x, axis, axis=0, tiled=True)
      return jax.lax.all_to_all(x, axis, dim + 1, 0, tiled=True)

    def workers(worker_params, batch):
      if k == 1:  # one worker per device: the plain gradient, the same kernels as data_parallel
        squeeze = lambda t: jax.tree.map(lambda x: x[0], t)
        (losses, aux), grads = jax.tree.map(lambda x: x[None], vg(squeeze(worker_params), squeeze(batch)))
      else:
        (losses, aux), grads = jax.vmap(vg)(worker_params, batch)  # f32[k], grads: [k, ...]
      grads = jax.tree.map(to_server, grads, specs)
      copies = jax.tree.map(to_server, worker_params, specs) if lam else ()  # the points DC-ASGD corrects from
      if d > 1:
        losses = jax.lax.all_gather(losses, axis, tiled=True)  # f32[N]
        aux = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, tiled=True), aux)  # [N, ...]
      return grads, copies, losses, aux

    stacked = jax.tree.map(lambda spec: P(None, *spec), specs, is_leaf=is_spec)  # [N, ...], the server's pieces
    # check_vma=False: the gathered values are equal on every device, which the type system cannot see
    return jax.shard_map(workers, mesh=mesh, in_specs=(P(axis), P(axis)),
                         out_specs=(stacked, stacked if lam else P(), P(), P()), check_vma=False)

  def pull_fn(specs):
    """The workers that delivered copy the server's parameters (one all-gather of the pieces)."""

    def pull(params, worker_params, deliver):
      mine = jax.lax.dynamic_slice_in_dim(deliver, jax.lax.axis_index(axis) * k, k)  # bool[k]

      def whole(piece, spec):
        dim = split_dim(spec)
        return piece if d == 1 or dim is None else jax.lax.all_gather(piece, axis, axis=dim, tiled=True)

      new = jax.tree.map(whole, params, specs)
      # each delivering worker's copy overwritten in place, the others untouched: no pass over every copy
      order = jnp.argsort(~mine, stable=True)

      def write(i, copies):
        return jax.tree.map(lambda c, p: jax.lax.dynamic_update_index_in_dim(c, p, order[i], 0), copies, new)

      return jax.lax.fori_loop(0, jnp.sum(mine.astype(jnp.int32)), write, worker_params)

    return jax.shard_map(pull, mesh=mesh, in_specs=(specs, P(axis), P()), out_specs=P(axis), check_vma=False)

  def server_tick(worker_params, batch, params, opt_state, version, deliver, pulled_version, sync):
    # worker_params: [N, ...] split over the workers axis; the server's params and opt_state: split as
    # server_specs; deliver: bool[N]; sync: bool, this tick is a synchronous round. Everything but the
    # workers' half runs on the server's pieces, each device updating its own (XLA partitions it).
    specs = server_specs(params)
    grads, copies, losses, aux = workers_fn(specs)(worker_params, batch)
    count = jnp.maximum(jnp.sum(deliver.astype(jnp.int32)), 1)
    # the mean delivered gradient (the update of a synchronous round), summed in worker order
    mean = jax.tree.map(lambda g: _masked_sum(deliver, g) / count.astype(g.dtype), grads)
    mean_loss = _masked_sum(deliver, losses) / count.astype(losses.dtype)  # value= of a synchronous round's update
    fetch = lambda tree, w: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, w, keepdims=False), tree)

    # The updates as one loop with no branch on the (large) server state, so XLA updates it in place:
    # a synchronous round is one trip on the mean gradient; otherwise one trip per delivered
    # gradient, delivering workers first in worker order.
    order = jnp.argsort(~deliver, stable=True)
    trips = jnp.where(sync, 1, jnp.sum(deliver.astype(jnp.int32)))

    def update(i, carry):
      params, opt_state, version, staleness = carry
      w = order[i]
      g = jax.lax.cond(sync, lambda: mean, lambda: fetch(grads, w))
      tau = jnp.where(sync, 0, version - pulled_version[w])
      if lam:  # DC-ASGD's first-order correction towards the gradient at the current parameters
        copy = jax.lax.cond(sync, lambda: params, lambda: fetch(copies, w))  # equal in a sync round
        g = jax.tree.map(lambda g, p, c: g + lam * g * g * (p - c), g, params, copy)
      value = jnp.where(sync, mean_loss, losses[w])  # the loss of the gradient applied (reduce_on_plateau)
      updates, opt_state = optimizer_update(optimizer, g, opt_state, params, value)
      if staleness_lr == "inverse":
        scale = 1.0 / jnp.maximum(1, tau).astype(jnp.float32)
        updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
      staleness = jnp.where(sync, staleness, staleness.at[w].set(tau))
      return optax.apply_updates(params, updates), opt_state, version + 1, staleness

    staleness = jnp.where(deliver, jnp.int32(0), jnp.int32(-1))
    params, opt_state, version, staleness = jax.lax.fori_loop(0, trips, update, (params, opt_state, version, staleness))
    worker_params = pull_fn(specs)(params, worker_params, deliver)
    return params, opt_state, version, staleness, mean, worker_params, losses, aux

  def ssp_allow(clock, alive, ready):
    """The largest subset of ``ready`` that keeps the alive clocks within max_staleness of each other."""
    if max_staleness is None:
      return ready
    m = jnp.min(jnp.where(alive, clock, _NEVER))
    slowest = alive & (clock == m)
    # the slowest clock moves up only if every slowest worker delivers now
    m_next = m + (jnp.all(~slowest | ready) & jnp.any(alive)).astype(jnp.int32)
    return ready & (clock + 1 - m_next <= max_staleness)

  def masked_mean(x, mask):
    # x: [N, ...], mask: bool[N]; the mean over the workers in mask (the others discarded, NaN or not)
    return _masked_sum(mask, x) / jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(x.dtype)

  def tick(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    ex = state.extra
    t = state.step
    key, k_pause, k_delay = jax.random.split(jax.random.wrap_key_data(state.key), 3)
    alive = ex["alive"] & (t < fail_arr)
    finished, delay_state = delay_model.finish(ex["delay"], k_delay, t, n)
    finished = finished.astype(bool)
    if pause_prob > 0:
      finished = finished & (jax.random.uniform(k_pause, (n,)) >= pause_prob)
    ready = (ex["pending"] | finished) & alive
    deliver = ssp_allow(ex["clock"], alive, ready)
    pending = ready & ~deliver

    version = ex["version"]
    sync = jnp.any(deliver) & jnp.all(deliver == alive) & jnp.all(~deliver | (ex["pulled_version"] == version))
    params, opt_state, version, staleness, mean_grad, worker_params, losses, aux = server_tick(
        ex["worker_params"], batch, state.params, state.opt_state, version, deliver, ex["pulled_version"], sync)
    delivered = deliver.astype(jnp.float32)
    clock = ex["clock"] + deliver.astype(jnp.int32)
    alive_clocks_min = jnp.min(jnp.where(alive, clock, _NEVER))
    alive_clocks_max = jnp.max(jnp.where(alive, clock, -1))
    clock_staleness = jnp.where(deliver, ex["clock"] - ex["pulled_clock"], -1)
    extra = {
        "worker_params": worker_params,
        "pulled_version": jnp.where(deliver, version, ex["pulled_version"]),
        "clock": clock,
        "alive": alive,
        "pending": pending,
        "pulled_clock": jnp.where(deliver, alive_clocks_min, ex["pulled_clock"]),
        "version": version,
        "delay": delay_state,
    }
    new_state = state.replace(step=t + 1, params=params, opt_state=opt_state, key=jax.random.key_data(key),
                              extra=extra)

    counted = alive | ~jnp.any(alive)  # the alive workers; every worker if none is alive
    loss = masked_mean(losses, counted)
    if aux is not None:
      aux = jax.tree.map(lambda a: masked_mean(a, counted), aux)
    num = jnp.sum(deliver.astype(jnp.int32))
    metrics = metrics_from(
        loss, mean_grad, aux, new_state.step,
        delivered=delivered,
        num_delivered=num,
        staleness=staleness,
        max_staleness=jnp.maximum(jnp.max(staleness), 0),
        mean_staleness=jnp.sum(jnp.where(deliver, staleness, 0)).astype(jnp.float32) / jnp.maximum(num, 1),
        clock_staleness=clock_staleness,
        max_clock_staleness=jnp.maximum(jnp.max(clock_staleness), 0),
        clock_spread=jnp.maximum(alive_clocks_max - alive_clocks_min, 0),
        num_alive=jnp.sum(alive.astype(jnp.int32)),
        version=version,
        sync_round=sync.astype(jnp.int32),
    )
    return place(new_state), jax.lax.with_sharding_constraint(metrics, replicated)

  extra_shardings = {name: replicated for name in
                     ("pulled_version", "clock", "alive", "pending", "pulled_clock", "version", "delay")}
  extra_shardings["worker_params"] = per_worker

  def place(state: TrainState) -> TrainState:
    """``state`` constrained to its layout (inside jit): the server's params and optimizer state split as
    ``server_specs``, the worker copies over the workers axis, the rest replicated; a tick never moves it."""
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), server_specs(state.params), is_leaf=is_spec)
    params, opt_state = pin_layout(state.params, state.opt_state, shardings, optimizer, mesh)
    rest = jax.lax.with_sharding_constraint((state.step, state.key, state.extra),
                                            (replicated, replicated, extra_shardings))
    return TrainState(step=rest[0], params=params, opt_state=opt_state, key=rest[1], extra=rest[2])

  def build(params, key_data):
    # one compiled program builds the whole state, placed as the step leaves it
    k_state, k_delay = jax.random.split(jax.random.wrap_key_data(key_data))
    extra = {
        "worker_params": jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params),
        "pulled_version": jnp.zeros((n,), jnp.int32),
        "clock": jnp.zeros((n,), jnp.int32),
        "alive": fail_arr > 0,
        "pending": jnp.zeros((n,), bool),
        "pulled_clock": jnp.zeros((n,), jnp.int32),
        "version": jnp.zeros((), jnp.int32),
        "delay": delay_model.init(k_delay, n),
    }
    return place(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            key=jax.random.key_data(k_state), extra=extra))

  build = jax.jit(build)

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    # replicate copies the params first, so donating the state never deletes the caller's arrays
    return build(mesh_lib.replicate(check_params(params), mesh),
                 raw_key(key, "init's key") if key is not None else base_key)

  def shard_batch(batch: Batch) -> Batch:
    # one process: [N, b, ...]; several: this process's workers [N/P, b, ...] (jdist.batches.put_batch)
    _check_worker_axis(batch, n, dim=0, what="batch", process_local=_process_local(batch))
    return batch_lib.put_batch(batch, per_worker)

  def step_fn(state: TrainState, batch: Batch):
    _check_worker_axis(batch, n, dim=0, what="batch")  # runs at trace time only
    return tick(state, batch)

  def run_fn(state: TrainState, batches: Batch, ticks: int):
    period = jax.tree.leaves(batches)[0].shape[0]

    def body(state, i):
      batch = jax.tree.map(lambda b: jax.lax.dynamic_index_in_dim(b, i % period, keepdims=False), batches)
      return tick(state, batch)

    state, metrics = jax.lax.scan(body, state, jnp.arange(ticks, dtype=jnp.int32))
    return place(state), metrics  # the scan's carry is laid out by XLA: pin what it returns (adafactor's v_row)

  step = StepFn(step_fn, mesh, donate_argnums=0)
  scan = StepFn(run_fn, mesh, donate_argnums=0, static_argnums=2)

  def run(state: TrainState, batches: Batch, ticks: int) -> tuple[TrainState, Metrics]:
    """Runs ``ticks`` ticks in one jitted ``lax.scan``; tick ``i`` of the call uses ``batches[i % T]``.

    Args:
      state: from ``init`` (donated).
      batches: leaves ``[T, num_workers, b, ...]``; ``T = ticks`` gives every tick its own batch,
        ``T = 1`` reuses one batch (full-batch training). In a multi-process run each process passes
        its own workers, ``[T, num_workers / P, b, ...]`` (as for ``shard_batch``).
      ticks: the number of ticks, a positive int.

    Returns:
      ``(state, metrics)``, each metric stacked with leading axis ``ticks``; equal to calling ``step``
      tick by tick.
    """
    ticks = check_positive_int(ticks, "ticks")
    process_local = _process_local(batches)
    _check_worker_axis(batches, n, dim=1, what="batches", process_local=process_local)
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batches)}
    if len(sizes) > 1:
      raise ValueError(f"async_sgd.run: batches leaves have different leading (tick) sizes {sorted(sizes)}; "
                       f"every leaf must be [T, num_workers, b, ...] with the same T.")
    if sizes == {0}:
      raise ValueError("async_sgd.run: batches have no ticks (T = 0 along axis 0); pass leaves [T, num_workers, b, "
                       "...] with T >= 1, e.g. split_workers(batch, num_workers)[None] for one batch.")
    sharding = NamedSharding(mesh, P(None, axis))
    if process_local:  # this process's workers [T, N/P, b, ...], at workers [p N/P, (p+1) N/P) of the mesh axis
      batch_lib.process_batch_rows(per_worker, n // jax.process_count())  # raises if the axis is laid out otherwise
      batches = jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (x.shape[0], n, *x.shape[2:])),
          batches)
    else:
      batches = jax.device_put(batches, sharding)
    return scan(state, batches, ticks)

  tags = [f"N={n}"]
  if max_staleness is not None:
    tags.append(f"s={max_staleness}")
  if pause_prob:
    tags.append(f"pause={pause_prob:g}")
  if delay is not None:
    tags.append(delay_model.name)
  if staleness_lr:
    tags.append(f"lr={staleness_lr}")
  if lam:
    tags.append(f"dc={lam:g}")
  if fail:
    tags.append(f"fail={dict(fail)}")
  info = {"num_workers": n, "max_staleness": max_staleness, "pause_prob": pause_prob, "delay": delay_model.name,
          "staleness_lr": staleness_lr, "delay_compensation": lam}
  return AsyncStrategy(init, shard_batch, step, f"async_sgd[{','.join(tags)}]", mesh, info, run=run)
