"""The ``async_sgd`` factory: it checks its options into an ``AsyncConfig`` and wires the tick's pieces."""
from __future__ import annotations

import types
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._types import Batch, LossFn, Metrics, Params, PRNGKey
from jdist.state import TrainState
from jdist.strategies.async_sgd._batches import check_worker_axis, process_local
from jdist.strategies.async_sgd._config import NEVER, AsyncConfig, describe, fail_ticks
from jdist.strategies.async_sgd._delays import DelayModel, as_delay_model, check_delay_model, pauses
from jdist.strategies.async_sgd._gate import Deliveries, deliveries, gate, slowest_clock
from jdist.strategies.async_sgd._pull import pull
from jdist.strategies.async_sgd._server import APPLY_RULES, is_spec, masked_mean, server_specs, workers_half
from jdist.strategy import KeyedLoss, StepFn, Strategy, metrics_from, pin_layout, raw_key, shard_key, value_and_grad

EXTRA_REPLICATED = ("pulled_version", "clock", "alive", "waiting", "pulled_clock", "version", "delay")


def place(cfg: AsyncConfig, mesh: Mesh, optimizer: Any, state: TrainState) -> TrainState:
  """``state`` constrained to its layout (inside jit): the server's params and optimizer state split as
  ``server_specs``, the worker copies over the workers axis, the rest replicated; a tick never moves it."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), server_specs(cfg, state.params), is_leaf=is_spec)
  params, opt_state = pin_layout(state.params, state.opt_state, shardings, optimizer, mesh)
  extra = {name: replicated for name in EXTRA_REPLICATED} | {"worker_params": NamedSharding(mesh, P(cfg.axis))}
  rest = jax.lax.with_sharding_constraint((state.step, state.key, state.extra), (replicated, replicated, extra))
  return TrainState(step=rest[0], params=params, opt_state=opt_state, key=rest[1], extra=rest[2])


def initial_state(cfg: AsyncConfig, mesh: Mesh, optimizer: Any, params: Params, key_data: jax.Array) -> TrainState:
  """Every worker alive (unless it fails at tick 0), at clock 0, computing on a copy of ``params``."""
  n = cfg.num_workers
  k_state, k_delay = jax.random.split(jax.random.wrap_key_data(key_data))
  zeros = jnp.zeros((n,), jnp.int32)
  extra = {
      "worker_params": jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params),
      "pulled_version": zeros, "clock": zeros, "pulled_clock": zeros,
      "alive": jnp.asarray(cfg.fail, jnp.int32) > 0,
      "waiting": jnp.zeros((n,), bool),
      "version": jnp.zeros((), jnp.int32),
      "delay": cfg.delay.init(k_delay, n),
  }
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                     key=jax.random.key_data(k_state), extra=extra)
  return place(cfg, mesh, optimizer, state)


def worker_keys(key_data: jax.Array, clock: jax.Array) -> jax.Array:
  """Raw keys uint32[N, 2] for a ``takes_key`` loss: worker w's is ``shard_key(state.key, clock[w], w)``, from the
  tick's key (split every tick), the worker's own clock (the gradients it delivered) and its index."""
  keys = jax.vmap(lambda c, w: shard_key(key_data, c, w))(clock, jnp.arange(clock.shape[0]))
  return jax.random.key_data(keys)


def tick(cfg: AsyncConfig, optimizer: Any, mesh: Mesh, vg: Callable, state: TrainState,
         batch: Batch, keyed: bool = False) -> tuple[TrainState, Metrics]:
  """One server tick: who delivers, the workers' gradients, the server's update, the SSP gate, the pull.
  ``keyed``: the loss takes a key (``worker_keys``)."""
  ex, t = state.extra, state.step
  key, k_delay = jax.random.split(jax.random.wrap_key_data(state.key))
  sched = deliveries(cfg, ex["alive"], ex["waiting"], ex["delay"], k_delay, t)
  deliver, alive = sched.deliver, sched.alive
  specs = server_specs(cfg, state.params)
  grads, copies, losses, aux = workers_half(cfg, mesh, vg, specs, cfg.delay_compensation > 0)(
      ex["worker_params"], batch, worker_keys(state.key, ex["clock"]) if keyed else None)
  (params, opt_state, version), staleness = APPLY_RULES[cfg.apply](
      cfg, optimizer, (state.params, state.opt_state, ex["version"]), grads, copies, losses, deliver,
      ex["pulled_version"])
  clock = ex["clock"] + deliver.astype(jnp.int32)
  pulls, waiting = gate(clock, alive, alive & (deliver | ex["waiting"]), cfg.max_staleness)
  extra = {
      "worker_params": pull(cfg, mesh, specs)(params, ex["worker_params"], pulls),
      "pulled_version": jnp.where(pulls, version, ex["pulled_version"]),
      "clock": clock,
      "alive": alive,
      "waiting": waiting,
      "pulled_clock": jnp.where(pulls, slowest_clock(clock, alive), ex["pulled_clock"]),
      "version": version,
      "delay": sched.delay_state,
  }
  new = state.replace(step=t + 1, params=params, opt_state=opt_state, key=jax.random.key_data(key), extra=extra)
  mean_grad = jax.tree.map(lambda g: masked_mean(deliver, g), grads)
  metrics = tick_metrics(ex, new.extra, sched, pulls, staleness, losses, aux, mean_grad, new.step)
  return place(cfg, mesh, optimizer, new), jax.lax.with_sharding_constraint(metrics, NamedSharding(mesh, P()))


def tick_metrics(before: dict, after: dict, sched: Deliveries, pulls: jax.Array, staleness: jax.Array,
                 losses: jax.Array, aux: Any, mean_grad: Params, step: jax.Array) -> Metrics:
  """A tick's metrics (``async_sgd``'s docstring lists them)."""
  alive, clock, deliver = after["alive"], after["clock"], sched.deliver
  # the loss of the gradients in progress: a waiting worker's copy is stale and computes nothing
  counted = sched.computing | ~jnp.any(sched.computing)
  num = jnp.sum(deliver.astype(jnp.int32))
  clock_staleness = jnp.where(deliver, before["clock"] - before["pulled_clock"], -1)
  sync = jnp.any(deliver) & jnp.all(deliver == alive) & jnp.all(~deliver | (before["pulled_version"]
                                                                            == before["version"]))
  return metrics_from(
      masked_mean(counted, losses), mean_grad,
      None if aux is None else jax.tree.map(lambda a: masked_mean(counted, a), aux), step,
      delivered=deliver.astype(jnp.float32),
      num_delivered=num,
      staleness=staleness,
      max_staleness=jnp.maximum(jnp.max(staleness), 0),
      mean_staleness=jnp.sum(jnp.where(deliver, staleness, 0)).astype(jnp.float32) / jnp.maximum(num, 1),
      clock_staleness=clock_staleness,
      max_clock_staleness=jnp.maximum(jnp.max(clock_staleness), 0),
      clock_spread=jnp.maximum(jnp.max(jnp.where(alive, clock, -1)) - slowest_clock(clock, alive), 0),
      pulled=pulls.astype(jnp.float32),
      waiting=after["waiting"].astype(jnp.float32),
      num_waiting=jnp.sum(after["waiting"].astype(jnp.int32)),
      num_alive=jnp.sum(alive.astype(jnp.int32)),
      version=after["version"],
      updates=after["version"] - before["version"],
      sync_round=sync.astype(jnp.int32),
  )


def workers_mesh(mesh: Mesh | None, axis: Any) -> tuple[Mesh, str]:
  """The mesh the workers run on and its workers axis: ``None`` is one device, ``jax.devices()[0]``.

  Raises:
    ValueError: ``None`` in a multi-process run, an axis that is not one name of the mesh, or a mesh with an
      axis of more than one device besides it (``IdleAxesError``).
  """
  axis = checks.one_axis(axis, who="async_sgd's workers axis", example="workers")
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
  return mesh, axis


def async_sgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None,
    *,
    num_workers: int,
    max_staleness: int | None = None,
    apply: Literal["mean", "each"] = "mean",
    pause_prob: float = 0.0,
    delay: DelayModel | Callable[..., jax.Array] | None = None,
    staleness_lr: Literal["inverse"] | None = None,
    delay_compensation: float = 0.0,
    fail: dict[int, int] | None = None,
    has_aux: bool = False,
    axis: str = "workers",
) -> Strategy:
  """Asynchronous SGD on an emulated parameter server; one ``step`` is one server tick.

  The rules of a tick are in the package docstring (``jdist.strategies.async_sgd``). In short: each alive,
  computing worker may finish the gradient of its copy (pauses, delay model) and delivers it at once; the
  server applies the tick's gradients by the ``apply`` rule; then the SSP gate lets each worker with no
  gradient in progress pull the new parameters and start its next one, or makes it wait.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (``(loss, aux)`` with ``has_aux``). A
      ``jdist.takes_key`` loss gets, for worker w, ``jdist.shard_key(state.key, clock[w], w)``: the tick's key
      (``state.key``, split every tick), the worker's clock (gradients it has delivered) and its index.
    optimizer: any ``optax.GradientTransformation``, the server's.
    mesh: where the workers run. Worker copies and batches are split over its ``axis`` (``num_workers``
      must be divisible by its size); the server's state is split over it too. ``None``: every worker on
      one device, ``jax.devices()[0]``, vmapped (the fastest layout on a CPU; one process only). In a
      multi-process run ``axis`` must run across the processes in process order (``jdist.make_mesh(
      workers=-1)`` does), so that process ``p`` holds workers ``p * N/P .. (p + 1) * N/P - 1``.
    num_workers: N, the number of emulated workers (>= 1).
    max_staleness: None (fully asynchronous) or s >= 0: Stale Synchronous Parallel, a worker waits before
      computing a gradient of clock c until every alive worker has delivered c - s; s = 0 is BSP.
    apply: ``"mean"``: the gradients delivered in a tick averaged into one optimizer update (each update
      moves the parameters one step of the learning rate, however many arrived); ``"each"``: every delivered
      gradient its own update (a tick with k deliveries moves them k steps). The same rule for every s.
    pause_prob: each tick each worker pauses (computes nothing) with this probability, in [0, 1):
      ``delay=pauses(pause_prob, delay)``.
    delay: None (every computing worker finishes every tick), a ``DelayModel`` (``fixed_speeds``,
      ``geometric``, ``uniform``, ``pauses``) or a pure function ``delay(key, tick, num_workers) ->
      bool[num_workers]`` (an integer mask counts nonzero as True). Traced once here to check the mask.
    staleness_lr: None, or ``"inverse"``: each update scaled by ``1 / max(1, mean staleness of its gradients)``.
    delay_compensation: lam >= 0 for DC-ASGD's ``g + lam * g * g * (w_server - w_pulled)``; 0 is off.
    fail: ``{worker: tick}``: the worker delivers nothing from that tick on (0: never runs).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    axis: the mesh axis the workers are split over: one name.

  Returns:
    A ``jdist.Strategy``: ``init(params, *, key=None)`` (the key, an int seed, a JAX key or raw key data,
    seeds every random draw of the schedule: pauses and delays; None is 0), ``shard_batch(batch)`` and
    ``step(state, batch)`` with batch leaves ``[num_workers, b, ...]`` (``split_workers`` makes them). Many
    ticks in one jitted scan: ``jdist.scan_steps(strategy, state, batches)`` with leaves ``[T, num_workers, b,
    ...]``; to reuse one batch every tick, broadcast it (``np.broadcast_to(x, (T, *x.shape))``).

    Batches in a multi-process run (P processes): each process passes to ``shard_batch`` only the slices of
    its own workers, leaves ``[N/P, b, ...]`` (``split_workers(share, N)`` of its share of the global batch),
    and the global ``[N, b, ...]`` batch is assembled with no communication; for ``scan_steps``, stack the
    global batches ``shard_batch`` returns.

    ``state.params`` / ``state.opt_state``: the server's, split over ``axis``. ``state.step``: ticks run.
    ``state.key``: raw uint32 key data, split every tick. ``state.extra``: ``worker_params`` (leaves
    ``[N, ...]``, split over ``axis``), ``pulled_version`` int32[N], ``clock`` int32[N] (gradients
    delivered), ``alive`` bool[N], ``waiting`` bool[N] (held at the SSP gate: no gradient in progress, not
    yet pulled), ``pulled_clock`` int32[N] (slowest alive clock at each worker's pull), ``version`` int32
    (server updates applied) and ``delay`` (the delay model's state).

    Metrics per tick: ``loss`` (mean over the workers computing this tick, alive and not waiting, of each one's
    loss on its own copy and batch slice; over all workers if none computes; likewise ``aux``), ``grad_norm``
    (of the mean delivered gradient; 0 if none), ``step``; per worker ``delivered``, ``pulled``, ``waiting``
    f32[N] (0/1), ``staleness`` and ``clock_staleness`` int32[N] (-1 where not delivered); scalars
    ``num_delivered``, ``max_staleness``, ``mean_staleness``, ``max_clock_staleness`` (<= s; 0 when nothing is
    delivered), ``clock_spread`` (of the alive clocks, <= s + 1), ``num_waiting``, ``num_alive``, ``version``,
    ``updates`` (applied this tick) and ``sync_round`` (1 when every alive worker delivered a gradient of the
    current version).

  Raises:
    OptionTypeError: pause_prob or delay_compensation not a real number, a delay that is not a model or
      a function. OptionError: num_workers < 1 or not divisible by the mesh axis, pause_prob outside [0, 1),
      a negative max_staleness, an unknown apply or staleness_lr, a negative delay_compensation, ``fail``
      naming a worker outside [0, num_workers) or a negative tick, a delay model for another number of
      workers. ValueError / TypeError: the axis (see ``workers_mesh``), a delay mask that is not
      bool[num_workers]. BatchError (at ``shard_batch`` / ``step``): leaves whose worker axis is not
      num_workers, or that disagree on the per-worker batch size b.

  Example:
    >>> strategy = async_sgd(linear.loss, optax.sgd(0.01), None, num_workers=4, pause_prob=0.05)  # doctest: +SKIP
    >>> state = strategy.init(linear.init(), key=0)                                                # doctest: +SKIP
    >>> one = split_workers(data, 4)  # the same batch every tick, broadcast over 3000 ticks       # doctest: +SKIP
    >>> batches = jax.tree.map(lambda x: np.broadcast_to(x, (3000, *x.shape)), one)                # doctest: +SKIP
    >>> state, metrics = jdist.scan_steps(strategy, state, batches)                                # doctest: +SKIP
  """
  checks.check_callable(loss_fn, "loss_fn")
  checks.check_optimizer(optimizer)
  n = checks.check_positive_int(num_workers, "num_workers")
  model = as_delay_model(delay)
  finish = pauses(pause_prob, model)  # checks pause_prob
  pause_prob = float(pause_prob)
  mesh, axis = workers_mesh(mesh, axis)
  cfg = AsyncConfig(num_workers=n, devices=mesh.shape[axis], axis=axis, max_staleness=max_staleness, apply=apply,
                    staleness_lr=staleness_lr, delay_compensation=delay_compensation, fail=fail_ticks(fail, n),
                    delay=finish if pause_prob else model)
  check_delay_model(model, n)  # fits n workers?
  vg = value_and_grad(loss_fn, has_aux=has_aux)
  build = jax.jit(lambda params, key_data: initial_state(cfg, mesh, optimizer, params, key_data))

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    # replicate copies the params first, so donating the state never deletes the caller's arrays
    return build(mesh_lib.replicate(checks.check_params(params), mesh), raw_key(key, "init's key"))

  def shard_batch(batch: Batch) -> Batch:
    # one process: [N, b, ...]; several: this process's workers [N/P, b, ...] (jdist.batches.put_batch)
    check_worker_axis(batch, n, local=process_local(batch))
    return batch_lib.put_batch(batch, NamedSharding(mesh, P(axis)))

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    check_worker_axis(batch, n)  # at trace time only
    return tick(cfg, optimizer, mesh, vg, state, batch, isinstance(loss_fn, KeyedLoss))

  name, info = describe(cfg, pause_prob, None if delay is None else model)
  step_fn = StepFn(step, mesh, donate_argnums=0)
  return Strategy(init, shard_batch, step_fn, name, mesh, types.MappingProxyType(info))


__all__ = ["NEVER", "async_sgd", "initial_state", "place", "tick", "tick_metrics", "workers_mesh"]
