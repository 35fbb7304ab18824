"""Tensor parallelism written out in ``jax.shard_map``: Megatron's column- and row-parallel matmuls.

The teaching version of what ``sharded`` with ``TP_RULES`` gets from GSPMD (tests check they agree).
Inside a ``shard_map`` over a ``model`` axis of N devices:

- ``column_parallel(x, w)``: x: [..., D] the same on every device; w: [D, F/N] this device's columns.
  Returns [..., F/N], this device's slice of the features. No communication forward; in the backward
  pass the gradient of x is summed over the axis (JAX inserts that psum, the transpose of using a
  replicated x in per-device work: Megatron's "f" operator).
- ``row_parallel(x, w, axis)``: x: [..., F/N]; w: [F/N, D] this device's rows. Each device's partial
  product is summed with one ``psum`` (Megatron's "g"): the one all-reduce of a TP block's forward.

So a TP MLP block costs one all-reduce of the activations [B, S, D] forward and one backward.
"""
from __future__ import annotations

from typing import Callable

import jax

from jdist._types import Params


def column_parallel(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """x: [..., D] (replicated over the axis), w: [D, F/N], b: [F/N] -> [..., F/N] (split over the axis)."""
  y = x @ w
  return y if b is None else y + b


def row_parallel(x: jax.Array, w: jax.Array, axis: str, b: jax.Array | None = None) -> jax.Array:
  """x: [..., F/N], w: [F/N, D] -> [..., D], summed over ``axis`` (one all-reduce); ``b`` added once."""
  y = jax.lax.psum(x @ w, axis)
  return y if b is None else y + b


def tp_mlp(params: Params, x: jax.Array, axis: str, activation: Callable = jax.nn.gelu) -> jax.Array:
  """The transformer MLP, tensor parallel: ``activation(x @ fc) @ proj`` with fc split by columns and proj by rows.

  params: ``{"fc": [D, 4D/N], "proj": [4D/N, D]}`` (this device's pieces); x: [..., D] replicated.
  """
  return row_parallel(activation(column_parallel(x, params["fc"])), params["proj"], axis)
