"""A residual MLP classifier: an input layer, a stack of identical residual layers, an output layer.

Its middle is a stack of identical layers (stacked on a leading axis, ``params["stages"]``), so the
same model trains with every strategy and also as a pipeline (``pipeline_fns``).

  h = tanh(x @ w_in + b_in);  h = h + tanh(h @ w + b) for each stacked layer;  logits = h @ w_out + b_out

Smooth (tanh) layers keep the float rounding of different strategies from being amplified through
ReLU on/off flips, so their runs stay close enough to compare over hundreds of Adam steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jdist._types import Batch, Params


def init(key: jax.Array, d_in: int, width: int, depth: int, classes: int) -> Params:
  """He-initialised weights; the residual layers start small (scaled by 1/sqrt(depth))."""
  k = jax.random.split(key, 3)
  return {
      "w_in": jax.random.normal(k[0], (d_in, width)) * jnp.sqrt(2.0 / d_in), "b_in": jnp.zeros((width,)),
      "stages": {"w": jax.random.normal(k[1], (depth, width, width)) * jnp.sqrt(2.0 / width) / jnp.sqrt(depth),
                 "b": jnp.zeros((depth, width))},
      "w_out": jax.random.normal(k[2], (width, classes)) / jnp.sqrt(width), "b_out": jnp.zeros((classes,)),
  }


def stage(layer: Params, h: jax.Array) -> jax.Array:
  """One residual layer; h: [B, width]."""
  return h + jnp.tanh(h @ layer["w"] + layer["b"])


def embed(params: Params, batch: Batch) -> jax.Array:
  return jnp.tanh(batch["x"] @ params["w_in"] + params["b_in"])


def head_loss(params: Params, h: jax.Array, batch: Batch) -> jax.Array:
  logits = h @ params["w_out"] + params["b_out"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def apply(params: Params, x: jax.Array) -> jax.Array:
  h = embed(params, {"x": x})
  h = jax.lax.scan(lambda h, layer: (stage(layer, h), None), h, params["stages"])[0]
  return h @ params["w_out"] + params["b_out"]


def loss(params: Params, batch: Batch) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, batch["x"]), batch["y"]).mean()


def loss_and_accuracy(params: Params, batch: Batch):
  logits = apply(params, batch["x"])
  return (optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(),
          {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])})


def pipeline_fns():
  """``(stage_fn, loss_fn, input_fn)`` for ``jdist.pipeline``; it equals ``loss`` on the same params."""
  return stage, head_loss, embed
