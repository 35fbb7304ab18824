"""Model averaging: local SGD and DiLoCo. Replicas train alone for H steps, then are averaged.

This is the article's AllReduce in its original form, theta = 1/N (w1 + ... + wN): each device
trains its own copy of the model on its own data; every ``sync_every`` steps the copies are averaged
with an AllReduce. Between syncs nothing is communicated, so the bytes per step fall by H.

With ``outer_optimizer`` the average is not taken as is: the change ``global - mean(replicas)`` is
treated as a gradient for the outer optimizer (DiLoCo: Douillard et al. 2023, with
``optax.sgd(0.7, momentum=0.9, nesterov=True)``). An outer SGD of lr 1 without momentum is plain
averaging; with H = 1 and plain SGD inside, local SGD is synchronous data parallelism (tested).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import collectives
from jdist import mesh as mesh_lib
from jdist._checks import (
  check_callable,
  check_optimizer,
  check_params,
  check_positive_int,
)
from jdist._types import Batch, LossFn, Params, PRNGKey
from jdist.state import TrainState
from jdist.strategy import (
  StepFn,
  Strategy,
  metrics_from,
  optimizer_update,
  raw_key,
  value_and_grad,
)


def local_sgd(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str = "data",
    sync_every: int = 1,
    outer_optimizer: optax.GradientTransformation | None = None,
    allreduce: str = "psum",
    has_aux: bool = False,
) -> Strategy:
  """Local SGD / DiLoCo over ``axis`` of ``mesh``: one step trains every replica once.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (``(loss, aux)`` with ``has_aux``).
    optimizer: the inner optimizer; each replica has its own state (never averaged).
    mesh: the device mesh; one replica per device along ``axis``.
    axis: the mesh axis holding the replicas: one name (several axes are a ``ValueError``).
    sync_every: H, the steps between averagings (>= 1).
    outer_optimizer: None for plain averaging, or an optax optimizer applied to the outer gradient
      ``global - mean(replicas)`` (DiLoCo).
    allreduce: the AllReduce algorithm for the averaging (``jdist.collectives.ALGORITHMS``, except
      "hierarchical", which needs two mesh axes).

  Returns:
    A ``Strategy``. ``state.params`` are the global (last averaged) parameters, replicated;
    ``state.extra`` holds ``replicas`` and ``inner_opt_state`` (leading axis: one per device) and the
    last measured ``spread``. Metrics: ``loss`` (mean over replicas), ``grad_norm`` (mean over replicas),
    ``synced`` (1 on averaging steps) and ``replica_spread``: sqrt(mean_i ||theta_i - mean||^2) of
    the replicas before the last averaging.
  """
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  if outer_optimizer is not None:
    check_optimizer(outer_optimizer)
  axis = checks.check_axis(mesh, axis, who="local_sgd", what="data axis")
  checks.check_no_idle_axes(mesh, (axis,), who="local_sgd", fix="Its replicas run over one axis: put all of "
                              "them on it")
  h = check_positive_int(sync_every, "sync_every")
  collectives.check_algorithm(allreduce)
  if allreduce == "hierarchical":
    raise ValueError("local_sgd averages over one mesh axis, and allreduce='hierarchical' needs two (outer, inner). "
                     "Use one of 'psum', 'ring', 'halving_doubling' or 'tree'.")
  n = mesh.shape[axis]
  replicated = NamedSharding(mesh, P())
  per_device = NamedSharding(mesh, P(axis))
  vg = value_and_grad(loss_fn, has_aux=has_aux)

  def local_step(step, params, opt_state, replicas, inner_state, spread, batch):
    # params, opt_state: global, replicated; replicas, inner_state: [1, ...] this device's; batch: [B/N, ...]
    mine = jax.tree.map(lambda r: r[0], replicas)
    inner = jax.tree.map(lambda r: r[0], inner_state)
    (loss, aux), grads = vg(mine, batch)
    updates, inner = optimizer_update(optimizer, grads, inner, mine, loss)  # each replica its own loss
    mine = optax.apply_updates(mine, updates)

    def average(_):
      mean = collectives.allreduce(mine, axis, algorithm=allreduce, op="mean")
      sq = sum(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))  # f32 whatever the params
               for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(mean)))
      new_spread = jnp.sqrt(jax.lax.pmean(sq, axis))
      if outer_optimizer is None:
        new_params, new_opt = mean, opt_state
      else:
        outer_grad = jax.tree.map(jnp.subtract, params, mean)
        outer_updates, new_opt = optimizer_update(outer_optimizer, outer_grad, opt_state, params,
                                                  jax.lax.pmean(loss, axis))  # the replicas' mean loss
        new_params = optax.apply_updates(params, outer_updates)
      return new_params, new_opt, new_params, new_spread, jnp.float32(1)

    def keep(_):
      return params, opt_state, mine, spread, jnp.float32(0)

    params, opt_state, mine, spread, synced = jax.lax.cond((step + 1) % h == 0, average, keep, None)
    loss, aux, grad_norm = jax.lax.pmean((loss, aux, optax.tree.norm(grads)), axis)
    expand = lambda t: jax.tree.map(lambda x: x[None], t)
    return params, opt_state, expand(mine), expand(inner), spread, (loss, aux, grad_norm, synced)

  sharded = jax.shard_map(
      local_step, mesh=mesh, in_specs=(P(), P(), P(), P(axis), P(axis), P(), P(axis)),
      out_specs=(P(), P(), P(axis), P(axis), P(), P()), check_vma=False)

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    params = mesh_lib.replicate(check_params(params), mesh)
    stack = jax.jit(lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), p), out_shardings=per_device)
    replicas = stack(params)
    inner_state = jax.jit(jax.vmap(optimizer.init), out_shardings=per_device)(replicas)
    opt_state = (jax.jit(outer_optimizer.init, out_shardings=replicated)(params)
                 if outer_optimizer is not None else optax.EmptyState())
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params, opt_state=opt_state,
                      key=jax.device_put(raw_key(key), replicated),
                      extra={"replicas": replicas, "inner_opt_state": inner_state,
                             "spread": jax.device_put(jnp.zeros((), jnp.float32), replicated)})

  def shard_batch(batch: Batch) -> Batch:
    # one process: the global batch; several: this process's share (jdist.batches.put_batch)
    return batch_lib.put_batch(batch, per_device, multiple_of=n)

  def step_fn(state: TrainState, batch: Batch):
    batch_lib.batch_size(batch, multiple_of=n)
    ex = state.extra
    params, opt_state, replicas, inner, spread, (loss, aux, grad_norm, synced) = sharded(
        state.step, state.params, state.opt_state, ex["replicas"], ex["inner_opt_state"], ex["spread"], batch)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              extra={"replicas": replicas, "inner_opt_state": inner, "spread": spread})
    return new_state, metrics_from(loss, {}, aux, new_state.step, grad_norm=grad_norm, synced=synced,
                                   replica_spread=spread)

  shardings = TrainState(step=replicated, params=replicated, opt_state=replicated, key=replicated,
                         extra={"replicas": per_device, "inner_opt_state": per_device, "spread": replicated})
  step = StepFn(step_fn, mesh, donate_argnums=0, out_shardings=(shardings, replicated))
  kind = "diloco" if outer_optimizer is not None else "local_sgd"
  return Strategy(init=init, shard_batch=shard_batch, step=step, name=f"{kind}[H={h}]", mesh=mesh,
                  info={"sync_every": h})
