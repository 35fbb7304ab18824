"""The server's side of a tick: its layout, the workers' gradients sent to it, and the two update rules.

As a parameter server shards its variables over its server tasks, each leaf of the server's parameters and
optimizer state is split over the workers axis on its first dimension that divides by the axis size D (leaves
under 1024 elements stay whole on every device, as under FSDP). The workers' gradients reach the pieces by one
all-to-all; every update then runs on the pieces, each device updating its own (``jit`` partitions the
optimizer, so one that looks across a leaf or across all leaves, adafactor or a global-norm clip, computes what
one device computes).

The update rules, the same for every ``max_staleness``:

- ``apply_mean``: the gradients delivered in a tick are averaged into one optimizer update (none if nothing
  was delivered). With every worker delivering on the current version this is one ``data_parallel`` step on
  the union of their batches.
- ``apply_each``: every delivered gradient is its own optimizer update, in worker order (the classic
  parameter server); a tick with k deliveries moves the parameters k times.

The staleness ``tau`` of a gradient is the number of server updates between its worker's pull and the update
that applies it. ``staleness_lr="inverse"`` scales an update by ``1 / max(1, mean tau of its gradients)``
(Zhang et al. 2016, who divide the learning rate by the average staleness of the gradients an update
aggregates; under ``"each"`` that is the gradient's own tau). DC-ASGD (Zheng et al. 2017) replaces each
gradient by ``g + lam * g * g * (w_server - w_pulled)``, ``w_server`` the parameters its update is applied to.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jdist._types import Params
from jdist.strategies.async_sgd._config import AsyncConfig
from jdist.strategies.model_parallel import DEFAULT_FSDP_MIN_SIZE
from jdist.strategy import optimizer_update

Server = tuple[Params, Any, jax.Array]  # (params, opt_state, version): the server's state, split as server_specs


def is_spec(x: Any) -> bool:
  return isinstance(x, P)


def split_dim(spec: P) -> int | None:
  """The dimension a server spec splits over the workers axis (None: the leaf is whole on every device)."""
  return next((i for i, e in enumerate(spec) if e is not None), None)


def server_specs(cfg: AsyncConfig, params: Params) -> Any:
  """The server state's layout: each leaf split over the workers axis on its first dimension that divides by D.

  The first such dimension keeps every piece one contiguous block for the all-to-all and the all-gather (on 8
  CPU devices the all-gather of the MLP benchmark's parameters took 2.1 ms so, 3.8 ms split on the largest
  dimension). Leaves under 1024 elements or with no such dimension stay whole everywhere.
  """
  d = cfg.devices

  def spec(leaf):
    shape = jnp.shape(leaf)
    dim = next((i for i, size in enumerate(shape) if size % d == 0), None)
    if d == 1 or dim is None or math.prod(shape) < DEFAULT_FSDP_MIN_SIZE:
      return P()
    return P(*([None] * dim), cfg.axis)

  return jax.tree.map(spec, params)


def masked_sum(mask: jax.Array, x: jax.Array) -> jax.Array:
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


def masked_mean(mask: jax.Array, x: jax.Array) -> jax.Array:
  """The mean of ``x[i]`` over the ``i`` in ``mask`` (0 when none is): the others discarded, NaN or not."""
  return masked_sum(mask, x) / jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(x.dtype)


def workers_half(cfg: AsyncConfig, mesh: Mesh, vg: Callable, specs: Any, with_copies: bool) -> Callable:
  """The workers' half of a tick, one ``shard_map`` over the workers axis: each device computes the losses and
  gradients of its k workers on their copies and sends each gradient to the server in pieces.

  Returns ``f(worker_params, batch, key_data) -> (grads, copies, losses, aux)``; ``key_data``: None, or each
  worker's raw key uint32[N, 2] for a ``takes_key`` loss. ``grads`` leaves ``[N, ...]`` split as the server's pieces;
  ``copies`` the worker copies laid out alike (only ``with_copies``, for DC-ASGD; else ``()``);
  ``losses`` f32[N] and ``aux`` ``[N, ...]`` on every device.
  """
  d, k, axis = cfg.devices, cfg.per_device, cfg.axis

  def to_server(x, spec):
    # x: [k, ...], this device's workers -> [N, ...], every worker's piece of the leaf that this device's part
    # of the server holds (an all-to-all); a leaf the server keeps whole comes from every device (all-gather)
    if d == 1:
      return x
    dim = split_dim(spec)
    if dim is None:
      return jax.lax.all_gather(x, axis, axis=0, tiled=True)
    return jax.lax.all_to_all(x, axis, dim + 1, 0, tiled=True)

  def workers(worker_params, batch, key_data):
    keys = None if key_data is None else jax.random.wrap_key_data(key_data)  # [k] this device's workers' keys
    if k == 1:  # one worker per device: the plain gradient, the same kernels as data_parallel
      squeeze = lambda t: jax.tree.map(lambda x: x[0], t)
      (losses, aux), grads = jax.tree.map(lambda x: x[None], vg(squeeze(worker_params), squeeze(batch),
                                                                 None if keys is None else keys[0]))
    else:
      (losses, aux), grads = jax.vmap(vg)(worker_params, batch, keys)  # f32[k], grads: [k, ...]
    grads = jax.tree.map(to_server, grads, specs)
    copies = jax.tree.map(to_server, worker_params, specs) if with_copies else ()
    if d > 1:
      losses = jax.lax.all_gather(losses, axis, tiled=True)  # f32[N]
      aux = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, tiled=True), aux)  # [N, ...]
    return grads, copies, losses, aux

  stacked = jax.tree.map(lambda spec: P(None, *spec), specs, is_leaf=is_spec)  # [N, ...], the server's pieces
  # check_vma=False: the gathered values are equal on every device, which the type system cannot see
  return jax.shard_map(workers, mesh=mesh, in_specs=(P(axis), P(axis), P(axis)),
                       out_specs=(stacked, stacked if with_copies else P(), P(), P()), check_vma=False)


def _update(cfg: AsyncConfig, optimizer: Any, params: Params, opt_state: Any, grads: Params, loss: jax.Array,
            tau: jax.Array) -> tuple[Params, Any]:
  """One optimizer update of the server by ``grads``, scaled by ``1 / max(1, tau)`` under ``staleness_lr``."""
  updates, opt_state = optimizer_update(optimizer, grads, opt_state, params, loss)
  if cfg.staleness_lr == "inverse":
    scale = 1.0 / jnp.maximum(1.0, tau.astype(jnp.float32))
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  return optax.apply_updates(params, updates), opt_state


def _dc(lam: float, g: Any, server: Params, copy: Any) -> Any:
  """DC-ASGD's first-order correction of ``g`` (taken at ``copy``) towards the gradient at ``server``."""
  return jax.tree.map(lambda g, p, c: g + lam * g * g * (p - c), g, server, copy)


def apply_mean(cfg: AsyncConfig, optimizer: Any, server: Server, grads: Params, copies: Any, losses: jax.Array,
               deliver: jax.Array, pulled_version: jax.Array) -> tuple[Server, jax.Array]:
  """The delivered gradients of a tick averaged (in worker order) into one optimizer update; none if none came.

  Returns the new server and each worker's staleness (int32[N], -1 where nothing was delivered).
  """
  params, opt_state, version = server
  count = jnp.sum(deliver.astype(jnp.int32))
  tau = jnp.where(deliver, version - pulled_version, -1)
  if cfg.delay_compensation:  # each gradient corrected from its own copy: copies [N, ...] against params [...]
    grads = _dc(cfg.delay_compensation, grads, params, copies)
  mean = jax.tree.map(lambda g: masked_mean(deliver, g), grads)
  loss = masked_mean(deliver, losses)  # value= of the update: the mean loss of its gradients (reduce_on_plateau)
  mean_tau = jnp.sum(jnp.maximum(tau, 0)) / jnp.maximum(count, 1)
  # a loop of 0 or 1 trips, not a cond: no branch on the (large) server state, so XLA updates it in place
  params, opt_state = jax.lax.fori_loop(
      0, jnp.minimum(count, 1), lambda _, c: _update(cfg, optimizer, *c, mean, loss, mean_tau), (params, opt_state))
  return (params, opt_state, version + jnp.minimum(count, 1)), tau


def apply_each(cfg: AsyncConfig, optimizer: Any, server: Server, grads: Params, copies: Any, losses: jax.Array,
               deliver: jax.Array, pulled_version: jax.Array) -> tuple[Server, jax.Array]:
  """Every delivered gradient its own optimizer update, in worker order; earlier updates of the tick count in
  the staleness of later ones. Returns the new server and each worker's staleness (-1 where none)."""
  fetch = lambda tree, w: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, w, keepdims=False), tree)
  order = jnp.argsort(~deliver, stable=True)  # the delivering workers first, in worker order

  def one(i, carry):
    params, opt_state, version, tau = carry
    w = order[i]
    g, t = fetch(grads, w), version - pulled_version[w]
    if cfg.delay_compensation:
      g = _dc(cfg.delay_compensation, g, params, fetch(copies, w))
    params, opt_state = _update(cfg, optimizer, params, opt_state, g, losses[w], t)
    return params, opt_state, version + 1, tau.at[w].set(t)

  params, opt_state, version = server
  tau = jnp.full(deliver.shape, -1, jnp.int32)
  params, opt_state, version, tau = jax.lax.fori_loop(0, jnp.sum(deliver.astype(jnp.int32)), one,
                                                      (params, opt_state, version, tau))
  return (params, opt_state, version), tau


APPLY_RULES = {"mean": apply_mean, "each": apply_each}
