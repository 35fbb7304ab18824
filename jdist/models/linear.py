"""Linear regression ``y = x @ w + b`` with a mean squared error, the seed article's model."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jdist._types import Batch, Params


def init(key: jax.Array | None = None, in_features: int = 1, out_features: int = 1, *, zeros: bool = True) -> Params:
  """Parameters ``{"w": f32[in, out], "b": f32[out]}``; zeros by default, else small normals from ``key``."""
  if zeros:
    return {"w": jnp.zeros((in_features, out_features)), "b": jnp.zeros((out_features,))}
  if key is None:
    raise ValueError("linear.init(zeros=False) draws random weights and needs a key, e.g. jax.random.key(0).")
  return {"w": 0.1 * jax.random.normal(key, (in_features, out_features)), "b": jnp.zeros((out_features,))}


def apply(params: Params, x: jax.Array) -> jax.Array:
  """x: f32[B, in] -> f32[B, out]."""
  return x @ params["w"] + params["b"]


def loss(params: Params, batch: Batch) -> jax.Array:
  """Mean squared error over the batch; ``batch = {"x": f32[B, in], "y": f32[B, out]}``."""
  return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2)
