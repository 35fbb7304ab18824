"""Model averaging: local SGD and DiLoCo. Replicas train alone for H steps, then are averaged.

This is the article's AllReduce in its original form, theta = 1/N (w1 + ... + wN): each device
trains its own copy of the model on its own data; every ``sync_every`` steps the copies are averaged
by a reducer (``jdist.reducers``: an exact mean by default, or a compressing one). Between syncs nothing is
communicated, so the bytes per step fall by H.

With ``outer_optimizer`` the average is not taken as is: the change ``global - replica`` of each device is
the outer gradient, averaged by the reducer and applied by the outer optimizer (DiLoCo: Douillard et al.
2023, with ``optax.sgd(0.7, momentum=0.9, nesterov=True)``). An outer SGD of lr 1 without momentum is plain
averaging; with H = 1 and plain SGD inside, local SGD is synchronous data parallelism (tested).
"""
from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._types import Batch, LossFn, Params, PRNGKey
from jdist.collectives import _reducers as reducers
from jdist.collectives._reducers import Reducer, ReducerState
from jdist.state import TrainState
from jdist.strategy import StepFn, Strategy, metrics_from, optimizer_update, raw_key, shard_keys, value_and_grad


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
  """What a local SGD step needs, checked and fixed when the strategy is built."""

  loss_fn: LossFn  # loss_fn(params, batch) -> scalar mean loss ((loss, aux) with has_aux)
  optimizer: optax.GradientTransformation  # the inner optimizer, one state per replica
  mesh: Mesh
  axis: str  # the mesh axis holding the replicas, one per device
  sync_every: int  # H >= 1: steps between averagings
  outer_optimizer: optax.GradientTransformation | None  # None: plain averaging; else DiLoCo's outer step
  has_aux: bool
  reducer: Reducer  # how the replicas (or DiLoCo's outer gradients) are averaged

  @property
  def n(self) -> int:
    return self.mesh.shape[self.axis]

  def sharding(self, spec: P) -> NamedSharding:
    return NamedSharding(self.mesh, spec)


def local_sgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str = "data",
    sync_every: int = 1,
    outer_optimizer: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    reducer: Reducer = reducers.mean(),
) -> Strategy:
  """Local SGD / DiLoCo over ``axis`` of ``mesh``: one step trains every replica once.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (``(loss, aux)`` with ``has_aux``); a
      ``jdist.takes_key`` loss gets ``jdist.shard_key(state.key, state.step, d)`` on device d of the axis.
    optimizer: the inner optimizer; each replica has its own state (never averaged).
    mesh: the device mesh; one replica per device along ``axis``.
    axis: the mesh axis holding the replicas: one name (several axes are a ``ValueError``).
    sync_every: H, the steps between averagings (>= 1).
    outer_optimizer: None for plain averaging, or an optax optimizer applied to the outer gradient
      ``global - mean(replicas)`` (DiLoCo).
    reducer: how the averaging communicates (``jdist.reducers``; default ``mean()``, psum): the replicas
      themselves are reduced for plain averaging, each replica's outer gradient ``global - replica`` for
      DiLoCo; e.g. ``mean("ring")``, or ``int8()`` to send a quarter of the bytes (with error feedback).
      "hierarchical" needs two mesh axes and so cannot run here.

  Returns:
    A ``Strategy``. ``state.params`` are the global (last averaged) parameters, replicated;
    ``state.extra`` holds ``replicas`` and ``inner_opt_state`` (leading axis: one per device), the
    last measured ``spread`` and the reducer's state (``reducer``). Metrics: ``loss`` (mean over replicas),
    ``grad_norm`` (mean over replicas), ``synced`` (1 on averaging steps) and ``replica_spread``:
    sqrt(mean_i ||theta_i - mean||^2) of the replicas before the last averaging. ``info``: ``sync_every``,
    ``axis``, ``devices`` and ``reducer`` (its name).
  """
  cfg = make_config(loss_fn, optimizer, mesh, axis=axis, sync_every=sync_every, outer_optimizer=outer_optimizer,
                    has_aux=has_aux, reducer=reducer)
  step = StepFn(functools.partial(step_fn, cfg, _sharded_step(cfg)), mesh, donate_argnums=0,
                out_shardings=(state_shardings(cfg), cfg.sharding(P())))
  kind = "diloco" if outer_optimizer is not None else "local_sgd"
  tags = [f"H={cfg.sync_every}"] + ([cfg.reducer.name] if cfg.reducer.name != "psum" else [])
  info = {"sync_every": cfg.sync_every, "axis": cfg.axis, "devices": cfg.n, "reducer": cfg.reducer.name}
  return Strategy(init=functools.partial(init, cfg), shard_batch=functools.partial(shard_batch, cfg), step=step,
                  name=f"{kind}[{','.join(tags)}]", mesh=mesh, info=types.MappingProxyType(info))


def make_config(loss_fn, optimizer, mesh, *, axis, sync_every, outer_optimizer, has_aux, reducer) -> LocalSGDConfig:
  """``local_sgd``'s arguments, checked."""
  checks.check_callable(loss_fn, "loss_fn")
  checks.check_optimizer(optimizer)
  if outer_optimizer is not None:
    checks.check_optimizer(outer_optimizer)
  axis = checks.check_axis(mesh, axis, who="local_sgd", what="data axis")
  checks.check_no_idle_axes(mesh, (axis,), who="local_sgd", fix="Its replicas run over one axis: put all of "
                            "them on it")
  h = checks.check_positive_int(sync_every, "sync_every")
  reducer = reducers.check_reducer(reducer)
  reducer.check(axis)
  return LocalSGDConfig(loss_fn=loss_fn, optimizer=optimizer, mesh=mesh, axis=axis, sync_every=h,
                        outer_optimizer=outer_optimizer, has_aux=has_aux, reducer=reducer)


def average(cfg: LocalSGDConfig, params: Params, opt_state, mine: Params, rstate: ReducerState, loss: jax.Array):
  """The sync, inside ``shard_map``: the new global params and outer state from every device's replica ``mine``.

  Returns ``(params, opt_state, rstate, spread)``; ``spread`` is sqrt(mean_i ||theta_i - mean||^2).
  """
  if cfg.outer_optimizer is None:
    mean, rstate = cfg.reducer.reduce(mine, rstate, cfg.axis)  # the model average itself
    new_params = mean
  else:
    # DiLoCo: each replica's change is its outer gradient; their mean (through the reducer) drives the outer step
    outer_grad, rstate = cfg.reducer.reduce(jax.tree.map(jnp.subtract, params, mine), rstate, cfg.axis)
    mean = jax.tree.map(jnp.subtract, params, outer_grad)
    updates, opt_state = optimizer_update(cfg.outer_optimizer, outer_grad, opt_state, params,
                                          jax.lax.pmean(loss, cfg.axis))  # the replicas' mean loss
    new_params = optax.apply_updates(params, updates)
  sq = sum(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))  # f32 whatever the params
           for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(mean)))
  return new_params, opt_state, rstate, jnp.sqrt(jax.lax.pmean(sq, cfg.axis))


def local_step(cfg: LocalSGDConfig, step: jax.Array, key_data: jax.Array, params: Params, opt_state, extra: dict,
               batch: Batch):
  """One device's step inside ``shard_map``: train its replica once, average every H-th step.

  step, key_data: the state's; params, opt_state: global, replicated; extra's ``replicas``, ``inner_opt_state``
  and the reducer's ``per_device`` part: [1, ...] this device's; batch: [B/N, ...].
  """
  first = lambda t: jax.tree.map(lambda x: x[0], t)
  mine, inner, rstate = first(extra["replicas"]), first(extra["inner_opt_state"]), reducers.local_view(extra["reducer"])
  # a takes_key loss: this device's batch is piece d of the global batch
  keys = shard_keys(cfg.loss_fn, key_data, step, jax.lax.axis_index(cfg.axis), 1)
  (loss, aux), grads = value_and_grad(cfg.loss_fn, has_aux=cfg.has_aux)(mine, batch, None if keys is None else keys[0])
  updates, inner = optimizer_update(cfg.optimizer, grads, inner, mine, loss)  # each replica its own loss
  mine = optax.apply_updates(mine, updates)

  def sync():
    new_params, new_opt, new_rstate, spread = average(cfg, params, opt_state, mine, rstate, loss)
    return new_params, new_opt, new_params, new_rstate, spread, jnp.float32(1)

  def keep():
    return params, opt_state, mine, rstate, extra["spread"], jnp.float32(0)

  params, opt_state, mine, rstate, spread, synced = jax.lax.cond((step + 1) % cfg.sync_every == 0, sync, keep)
  loss, aux, grad_norm = jax.lax.pmean((loss, aux, optax.tree.norm(grads)), cfg.axis)
  expand = lambda t: jax.tree.map(lambda x: x[None], t)
  extra = {"replicas": expand(mine), "inner_opt_state": expand(inner), "spread": spread,
           "reducer": reducers.stored_view(rstate)}
  return params, opt_state, extra, (loss, aux, grad_norm, synced)


def _extra_specs(axis: str) -> dict:
  return {"replicas": P(axis), "inner_opt_state": P(axis), "spread": P(),
          "reducer": ReducerState(per_device=P(axis), shared=P())}


def _sharded_step(cfg: LocalSGDConfig):
  # the averages come from reducers (ppermute-built for ring) and the cond's branches: equal on every device by
  # construction, which the varying-axes types cannot see
  return jax.shard_map(functools.partial(local_step, cfg), mesh=cfg.mesh,
                       in_specs=(P(), P(), P(), P(), _extra_specs(cfg.axis), P(cfg.axis)),
                       out_specs=(P(), P(), _extra_specs(cfg.axis), P()), check_vma=False)


def state_shardings(cfg: LocalSGDConfig) -> TrainState:
  """Global params and outer state replicated; replicas, inner states and reducer rows one per device."""
  rep = cfg.sharding(P())
  extra = jax.tree.map(cfg.sharding, _extra_specs(cfg.axis), is_leaf=lambda x: isinstance(x, P))
  return TrainState(step=rep, params=rep, opt_state=rep, key=rep, extra=extra)


def init(cfg: LocalSGDConfig, params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
  """Every replica starts as ``params``; the reducer's state from a key split off ``key``."""
  rep, per_device = cfg.sharding(P()), cfg.sharding(P(cfg.axis))
  params = mesh_lib.replicate(checks.check_params(params), cfg.mesh)
  stack = jax.jit(lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.n,) + x.shape), p),
                  out_shardings=per_device)
  replicas = stack(params)
  inner_state = jax.jit(jax.vmap(cfg.optimizer.init), out_shardings=per_device)(replicas)
  opt_state = (jax.jit(cfg.outer_optimizer.init, out_shardings=rep)(params)
               if cfg.outer_optimizer is not None else optax.EmptyState())
  key, reducer_key = jax.random.split(raw_key(key))
  extra = {"replicas": replicas, "inner_opt_state": inner_state,
           "spread": jax.device_put(jnp.zeros((), jnp.float32), rep),
           "reducer": reducers.init_state(cfg.reducer, params, reducer_key, cfg.mesh, (cfg.axis,))}
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
                    key=jax.device_put(key, rep), extra=extra)


def shard_batch(cfg: LocalSGDConfig, batch: Batch) -> Batch:
  """One process: the global batch split over the replicas; several: this process's share."""
  return batch_lib.put_batch(batch, cfg.sharding(P(cfg.axis)), multiple_of=cfg.n)


def step_fn(cfg: LocalSGDConfig, sharded, state: TrainState, batch: Batch):
  """Every replica trains once; every H-th step they are averaged into ``state.params``."""
  batch_lib.batch_size(batch, multiple_of=cfg.n)
  params, opt_state, extra, (loss, aux, grad_norm, synced) = sharded(state.step, state.key, state.params,
                                                                      state.opt_state, state.extra, batch)
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
  return state, metrics_from(loss, {}, aux, state.step, grad_norm=grad_norm, synced=synced,
                             replica_spread=extra["spread"])
