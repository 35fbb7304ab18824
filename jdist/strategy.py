"""The common shape of every training strategy, and helpers the strategies share."""
from __future__ import annotations

import types
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jdist._checks import check_callable
from jdist._types import Batch, LossFn, Metrics, Params, PRNGKey
from jdist.errors import BatchError, OptionTypeError
from jdist.state import TrainState


class Strategy(NamedTuple):
  """A way of training, as a tuple of pure functions (like an optax ``GradientTransformation``).

  Attributes:
    init: ``init(params, *, key=None) -> TrainState``; places (or shards) the params, builds the
      optimizer state.
    shard_batch: ``shard_batch(host_batch) -> batch`` in the layout ``step`` expects.
    step: ``step(state, batch) -> (state, metrics)``; jitted, ``state`` donated. ``metrics["loss"]``
      is the mean loss over the global batch.
    name: a short human-readable name, used in logs and tables.
    mesh: the device mesh the strategy runs on.
    info: facts about the strategy for reports, e.g. ``{"sync_every": 4}`` when the step's collectives
      run only every 4th step.
  """

  init: Callable[..., TrainState]
  shard_batch: Callable[[Batch], Batch]
  step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  name: str
  mesh: Mesh
  info: Mapping[str, Any] = types.MappingProxyType({})  # read-only: one default shared by every strategy


class StepFn:
  """A jitted step, plus the guard that keeps emulated CPU devices from deadlocking.

  On JAX 0.10's CPU backend, dispatching a collective program while the previous one is still running
  can deadlock when the emulated devices outnumber the cores (seen: 8 devices on 2 cores hang at an
  all-reduce rendezvous after a few dozen un-synchronised steps). On a multi-device CPU mesh the step
  therefore waits for its result before returning; on GPU/TPU dispatch stays asynchronous.

  ``lower`` and ``jitted`` expose the underlying ``jax.jit`` function (for HLO and memory reports).
  """

  def __init__(self, fn: Callable, mesh: Mesh, **jit_kwargs: Any):
    self.jitted = jax.jit(fn, **jit_kwargs)
    self.lower = self.jitted.lower
    self._fn, self._mesh = fn, mesh
    self._scans: dict[Any, StepFn] = {}
    self._sync = mesh.devices.flat[0].platform == "cpu" and mesh.size > 1

  def __call__(self, *args: Any) -> Any:
    _check_state(args[0] if args else None)
    out = self.jitted(*args)
    if self._sync:
      jax.block_until_ready(out)
    return out

  def scan(self, state: Any, batches: Any) -> Any:
    """``lax.scan`` of this step over the leading axis of ``batches`` (``jdist.scan_steps``), jitted once per
    state layout. The final state keeps the layout of the state given: XLA would otherwise lay out the scan's
    carry itself (e.g. adafactor's factored moments split where the step keeps them whole), and the next
    ``step`` would compile again for it."""
    _check_state(state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    key = (jax.tree.structure(state), tuple(jax.tree.leaves(shardings)))
    if key not in self._scans:
      run = lambda s, bs: jax.lax.scan(self._fn, s, bs)
      self._scans[key] = StepFn(run, self._mesh, donate_argnums=0, out_shardings=(shardings, None))
    return self._scans[key](state, batches)


def _check_state(state: Any) -> None:
  """A step's first argument is a live ``TrainState``: not params, and not a state already given to a step
  (its arrays were donated to that step and are gone; JAX's CPU backend can crash on them)."""
  if not isinstance(state, TrainState):
    raise OptionTypeError("a step's state", state, "a jdist.TrainState",
                          "Pass the state from strategy.init(params), then the one each step returns.")
  step = state.step
  if isinstance(step, jax.Array) and step.is_deleted():
    raise ValueError("This TrainState was already passed to a step, which took (donated) its arrays. Use the "
                     "state that step returned: state, metrics = strategy.step(state, batch).")


def scan_steps(strategy: Strategy, state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
  """Runs one step per leading slice of ``batches`` in a single jitted ``lax.scan``, for any strategy.

  Equal to calling ``strategy.step`` on each slice in turn (the same traced step, inlined), without a
  dispatch per step: for short steps (small models, the async emulator's ticks) the Python loop dominates.

  Args:
    strategy: any ``Strategy`` (its ``step`` a ``StepFn``).
    state: from ``strategy.init`` (donated).
    batches: the per-step batches stacked on a new leading axis: leaves ``[T, ...]`` where each
      ``[...]`` is what ``strategy.step`` takes (a global batch; ``[num_workers, b, ...]`` for async SGD).
      Host arrays are fine: each step's slice is laid out as its step needs inside the program.

  Returns:
    ``(state, metrics)`` with every metric stacked on a leading axis of ``T``.
  """
  if not isinstance(strategy, Strategy) or not isinstance(strategy.step, StepFn):
    raise OptionTypeError("strategy", strategy, "a jdist Strategy (from jdist.data_parallel, jdist.sharded, ...)")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batches)}
  if len(sizes) != 1 or None in sizes or 0 in sizes:
    raise BatchError(f"scan_steps needs batches stacked on a leading step axis of one size T >= 1 on every leaf, "
                     f"got leading sizes {sorted(map(str, sizes))}.", {}, 1)
  return strategy.step.scan(state, batches)


def optimizer_shardings(optimizer: Any, opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state (arrays, shapes or tracers): like the param where a state leaf
  mirrors it with the same shape (moments, traces), replicated for everything else (step counts, the
  factored row / column moments of adafactor); the masked-out leaves of ``optax.masked`` /
  ``multi_transform`` stay ``MaskedNode``."""
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  replicated = NamedSharding(mesh, PartitionSpec())
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def like_param(leaf, param, sharding):
    if masked(leaf):
      return leaf
    return sharding if getattr(leaf, "shape", None) == getattr(param, "shape", ()) else replicated

  try:
    return optax.tree_map_params(optimizer, like_param, opt_state, params, param_shardings,
                                 transform_non_params=lambda x: x if masked(x) else replicated, is_leaf=masked)
  except (ValueError, TypeError):
    # an optimizer whose init cannot run on optax's placeholder tree (sm3's per-axis lists, muon given
    # dimension numbers): a state leaf of a parameter's shape is sharded like the parameters of that shape
    # where they agree, everything else replicated. Placement only: the step computes the same either way.
    by_shape: dict[Any, list] = {}
    for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)):
      by_shape.setdefault(np.shape(param), []).append(sharding)

    def by_leaf(leaf):
      if masked(leaf):
        return leaf
      found = by_shape.get(getattr(leaf, "shape", None), [])
      return found[0] if found and all(f == found[0] for f in found) else replicated

    return jax.tree.map(by_leaf, opt_state, is_leaf=masked)


def pin_layout(params: Params, opt_state: Any, param_shardings: Any, optimizer: Any, mesh: Mesh) -> tuple[Any, Any]:
  """Inside a jitted step: the new ``params`` and ``opt_state`` constrained to the layout ``sharded_state``
  gives them, so a step never moves the state (XLA would otherwise choose a layout for an optimizer's own
  arrays, e.g. sm3's per-axis accumulators, and the next step would compile again for it)."""
  opt_shardings = optimizer_shardings(optimizer, opt_state, params, param_shardings, mesh)
  return (jax.lax.with_sharding_constraint(params, param_shardings),
          jax.lax.with_sharding_constraint(opt_state, opt_shardings))


def sharded_state(params: Params, param_shardings: Any, optimizer: Any, mesh: Mesh, key: Any) -> TrainState:
  """A ``TrainState`` with fresh copies of ``params`` placed by ``param_shardings`` and the optimizer state
  sharded like them (built in place by a jitted ``optimizer.init``); step and key replicated."""
  from jax.sharding import NamedSharding, PartitionSpec

  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), params), param_shardings)
  opt_shardings = optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, params), params, param_shardings,
                                      mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, opt_state=opt_state,
                    key=jax.device_put(raw_key(key), replicated))


def optimizer_update(optimizer: Any, grads: Any, opt_state: Any, params: Any, loss: jax.Array) -> tuple[Any, Any]:
  """``optimizer.update(grads, opt_state, params, value=loss)``: the step's loss reaches the transformations
  that need it (``optax.contrib.reduce_on_plateau``, ``optax.polyak_sgd``), as a single-device loop would pass
  it; every other transformation ignores it (a plain ``GradientTransformation`` through
  ``optax.with_extra_args_support``). One that takes extra arguments but refuses ``value`` (``optax.contrib.sam``)
  is called without it, as a single-device loop calls it."""
  import optax

  try:
    return optax.with_extra_args_support(optimizer).update(grads, opt_state, params, value=loss)
  except TypeError as e:  # raised while tracing: nothing has run yet
    if "unexpected keyword argument 'value'" in str(e):
      return optimizer.update(grads, opt_state, params)
    if "required keyword-only argument" not in str(e):
      raise
    raise TypeError(f"{e}. A jdist strategy calls optimizer.update(grads, state, params, value=loss) with the mean "
                    f"loss of the step's batch; an optimizer that needs more (e.g. lbfgs's value_fn) cannot run "
                    f"under it.") from None


def apply_update(state: TrainState, grads: Params, loss: jax.Array, optimizer: Any, *,
                 layout: tuple[Any, Mesh] | None = None, **changes: Any) -> TrainState:
  """The ending every gradient strategy shares: one optimizer update of ``state`` by ``grads``.

  ``optimizer_update`` (with ``value=loss``), ``optax.apply_updates``, then, with ``layout=(param_shardings,
  mesh)``, ``pin_layout`` so the new state keeps the old one's placement; ``step`` advances by one and
  ``changes`` (e.g. ``extra=``) replace other fields. Runs inside the jitted step.
  """
  import optax

  updates, opt_state = optimizer_update(optimizer, grads, state.opt_state, state.params, loss)
  params = optax.apply_updates(state.params, updates)
  if layout is not None:
    params, opt_state = pin_layout(params, opt_state, layout[0], optimizer, layout[1])
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **changes)


def raw_key(key: PRNGKey | int | None, what: str = "key") -> jax.Array:
  """``key`` as raw uint32 key data (checkpointable), after checking it is a key or a seed.

  Accepted: None (seed 0), an int seed (a Python or numpy int, or a 0-d integer array), a single typed
  JAX key (``jax.random.key``) or raw key data (``jax.random.key_data``) of the default implementation.

  Raises:
    TypeError: anything else (a str, a float, a bool, an array of another shape or dtype).
    ValueError: a typed key of another implementation than the default one.
  """
  data = jax.random.key_data(jax.random.key(0))  # the default implementation's raw key data
  if key is None:
    key = 0
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key_data(jax.random.key(int(key)))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
      got = jax.random.key_data(key)
      if got.shape != data.shape:
        raise ValueError(f"{what} is a key of implementation {jax.random.key_impl(key)}, whose raw data has shape "
                         f"{got.shape}, but jdist keeps key data of the default implementation (shape "
                         f"{data.shape}). Pass jax.random.key(seed) or an int seed.")
      return got
    if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
      return jax.random.key_data(jax.random.key(int(key)))
    if key.shape == data.shape and key.dtype == data.dtype:
      return jnp.asarray(key)
  got = f"{type(key).__name__} of shape {key.shape} and dtype {key.dtype}" if hasattr(key, "dtype") else repr(key)
  raise TypeError(f"{what} must be a JAX PRNG key (jax.random.key(0)), raw uint32 key data "
                  f"(jax.random.key_data(key), {data.dtype}{list(data.shape)}) or an int seed, got {got}.")


class KeyedLoss(NamedTuple):
  """A loss that draws random numbers (dropout): ``fn(params, batch, key)``; made by ``jdist.takes_key``."""

  fn: Callable[..., Any]

  def __call__(self, params: Params, batch: Batch, key: jax.Array) -> Any:
    return self.fn(params, batch, key)


def takes_key(loss_fn: LossFn) -> KeyedLoss:
  """Marks ``loss_fn(params, batch, key)`` as taking a PRNG key, for any strategy (opt-in: a plain
  ``loss_fn(params, batch)`` gets none).

  The key comes from ``state.key`` (the one place a strategy's randomness comes from, set by ``init``'s
  ``key``) and is new every step: the piece of the global batch numbered ``shard`` (the equal pieces in
  batch order: devices along the data axes, then micro-batches) gets ``shard_key(state.key, step, shard)``.
  So a run on any number of devices equals one device that splits the batch into the same pieces.
  """
  if isinstance(loss_fn, KeyedLoss):
    return loss_fn
  check_callable(loss_fn, "loss_fn")
  return KeyedLoss(loss_fn)


def shard_key(key_data: jax.Array, step: jax.Array, shard: jax.Array | int) -> jax.Array:
  """The key a ``takes_key`` loss gets for piece ``shard`` of step ``step``'s batch (see ``takes_key``):
  ``fold_in(fold_in(key, step), shard)`` of the state's raw key data."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(key_data), step), shard)


def shard_keys(loss_fn: LossFn, key_data: jax.Array, step: jax.Array, first: jax.Array | int,
               count: int) -> jax.Array | None:
  """The keys of ``count`` consecutive pieces from ``first`` (``shard_key`` of each, a key array ``[count]``) for a
  ``takes_key`` loss; None for a plain one, which gets no key (and costs nothing)."""
  if not isinstance(loss_fn, KeyedLoss):
    return None
  return jax.vmap(lambda j: shard_key(key_data, step, first + j))(jnp.arange(count))


def value_and_grad(loss_fn: LossFn, *, has_aux: bool) -> Callable[..., tuple[tuple[jax.Array, Any], Params]]:
  """``jax.value_and_grad`` that always returns ``((loss, aux), grads)`` and checks the loss is a scalar.

  The result takes ``(params, batch, key=None)``; ``key`` reaches a ``takes_key`` loss (and must be given for
  one), a plain loss ignores it. Integer and bool leaves of ``aux`` become float32: strategies report aux as a
  mean over devices and micro-batches (e.g. a count of 14 on one device is 1.75 per device on 8), as
  ``lax.pmean`` would.
  """
  if isinstance(loss_fn, KeyedLoss):
    def call(params, batch, key=None):
      if key is None:
        raise TypeError("This strategy has no key to give a takes_key loss.")  # a strategy's bug, not the user's
      return loss_and_aux(loss_fn.fn(params, batch, key), has_aux)
  else:
    call = lambda params, batch, key=None: loss_and_aux(loss_fn(params, batch), has_aux)
  return jax.value_and_grad(call, has_aux=True)


def loss_and_aux(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  """A loss function's output as ``(scalar loss, aux or None)``, checked; integer and bool aux leaves
  as float32 (they are averaged like every metric)."""
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      got = (f"an array of shape {jnp.shape(out)}" if hasattr(out, "shape") else
             f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
      raise TypeError(f"With has_aux=True, loss_fn must return (loss, aux); it returned {got}. Return a pair, or "
                      f"drop has_aux=True.")
    loss, aux = out
  else:
    if isinstance(out, tuple):
      raise TypeError("loss_fn returned a tuple; if the second item is auxiliary output, pass has_aux=True.")
    loss, aux = out, None
  aux = jax.tree.map(lambda a: jnp.asarray(a) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)
                     else jnp.asarray(a, jnp.float32), aux)
  if jnp.shape(loss) != ():
    raise ValueError(
        f"loss_fn must return a scalar (the mean loss over the examples it is given), but it returned "
        f"shape {jnp.shape(loss)}. Reduce it, e.g. with jnp.mean(...).")
  return loss, aux


def accumulate(vg: Callable, params: Params, batch: Batch, steps: int,
               keys: jax.Array | None = None) -> tuple[jax.Array, Any, Params]:
  """Mean loss, aux and gradient over ``steps`` equal micro-batches of ``batch``, via ``lax.scan``.

  ``keys``: None, or one key per micro-batch (a key array ``[steps]``, from ``shard_keys``) for a ``takes_key``
  loss. Returns ``(loss, aux, grads)``, equal to one ``vg`` on the whole batch (for mean losses and no keys).
  """
  key = lambda i: None if keys is None else keys[i]
  if steps == 1:
    (loss, aux), grads = vg(params, batch, key(0))
    return loss, aux, grads
  micro = jax.tree.map(lambda x: x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  rest = jax.tree.map(lambda x: x[1:], micro)
  (loss0, aux0), grads0 = vg(params, first, key(0))

  def body(carry, xs):
    loss, grads = carry
    mb, k = xs
    (l, a), g = vg(params, mb, k)
    return (loss + l, jax.tree.map(jnp.add, grads, g)), a

  (loss, grads), auxes = jax.lax.scan(body, (loss0, grads0), (rest, None if keys is None else keys[1:]))
  aux = jax.tree.map(lambda a0, a: (a0 + a.sum(0)) / steps, aux0, auxes)
  return loss / steps, aux, jax.tree.map(lambda g: g / steps, grads)


def metrics_from(loss: jax.Array, grads: Params, aux: Any, step: jax.Array, **extra: Any) -> Metrics:
  """The metrics every gradient-based strategy reports (``loss``, ``grad_norm``, ``step``), the strategy's
  own ``extra`` ones (which may replace ``grad_norm``), and ``aux``: a dict merged in, anything else as
  ``"aux"``. An aux key that names one of the strategy's metrics is an error, not a silent overwrite."""
  import optax

  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "step": step, **extra}
  if isinstance(aux, dict):
    clash = sorted(set(map(str, aux)) & set(metrics))
    if clash:
      raise ValueError(f"loss_fn's aux has key(s) {clash}, which would overwrite the strategy's own metrics "
                       f"{sorted(metrics)}. Rename them in the aux dict, e.g. {clash[0]!r} -> 'aux_{clash[0]}'.")
    metrics.update(aux)
  elif aux is not None:
    metrics["aux"] = aux
  return metrics
