"""The pull: the workers that pass the SSP gate copy the server's parameters (one all-gather of the pieces)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jdist.strategies.async_sgd._config import AsyncConfig
from jdist.strategies.async_sgd._server import split_dim


def pull(cfg: AsyncConfig, mesh: Mesh, specs: Any) -> Callable:
  """``f(params, worker_params, mask) -> worker_params``: the workers in ``mask`` (bool[N]) copy ``params``.

  ``params`` is the server's, split as ``specs``; ``worker_params`` leaves are ``[N, ...]`` split over the
  workers axis. Each device gathers the server's pieces once and overwrites only the copies of its workers in
  ``mask``, in place: no pass over every copy.
  """
  d, k, axis = cfg.devices, cfg.per_device, cfg.axis

  def body(params, worker_params, mask):
    mine = jax.lax.dynamic_slice_in_dim(mask, jax.lax.axis_index(axis) * k, k)  # bool[k]

    def whole(piece, spec):
      dim = split_dim(spec)
      return piece if d == 1 or dim is None else jax.lax.all_gather(piece, axis, axis=dim, tiled=True)

    new = jax.tree.map(whole, params, specs)
    order = jnp.argsort(~mine, stable=True)

    def write(i, copies):
      return jax.tree.map(lambda c, p: jax.lax.dynamic_update_index_in_dim(c, p, order[i], 0), copies, new)

    return jax.lax.fori_loop(0, jnp.sum(mine.astype(jnp.int32)), write, worker_params)

  return jax.shard_map(body, mesh=mesh, in_specs=(specs, P(axis), P()), out_specs=P(axis), check_vma=False)
