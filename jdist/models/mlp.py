"""A multi-layer perceptron classifier with ReLU hidden layers and a softmax cross-entropy loss."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from jdist._types import Batch, Params


def init(key: jax.Array, sizes: Sequence[int]) -> Params:
  """Parameters for layer sizes ``[in, hidden..., classes]``: ``{"layers": [{"w", "b"}, ...]}``.

  Weights use He (fan-in) initialisation, biases start at zero.
  """
  if len(sizes) < 2:
    raise ValueError(f"mlp.init needs at least an input and an output size, got sizes={list(sizes)}.")
  keys = jax.random.split(key, len(sizes) - 1)
  layers = []
  for k, (fan_in, fan_out) in zip(keys, zip(sizes[:-1], sizes[1:])):
    layers.append({"w": jax.random.normal(k, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in),
                   "b": jnp.zeros((fan_out,))})
  return {"layers": layers}


def apply(params: Params, x: jax.Array) -> jax.Array:
  """x: f32[B, in] -> logits f32[B, classes]."""
  *hidden, last = params["layers"]
  for layer in hidden:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ last["w"] + last["b"]


def loss(params: Params, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy; ``batch = {"x": f32[B, in], "y": int[B]}``."""
  logits = apply(params, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def loss_and_accuracy(params: Params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``(loss, {"accuracy": ...})``, for strategies built with ``has_aux=True``."""
  logits = apply(params, batch["x"])
  loss_ = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def accuracy(params: Params, batch: Batch) -> jax.Array:
  """Fraction of examples whose largest logit is the label."""
  return jnp.mean(jnp.argmax(apply(params, batch["x"]), -1) == batch["y"])


def tp_rules(num_layers: int, axis: str = "model") -> tuple:
  """Megatron rules for ``num_layers`` linear layers: even layers split by columns, odd ones by rows.

  A column-split layer's bias is split with its outputs; a row-split layer's bias stays whole.
  """
  rules = []
  for i in range(num_layers):
    if i % 2 == 0:
      rules += [(rf"^layers/{i}/w$", (None, axis)), (rf"^layers/{i}/b$", (axis,))]
    else:
      rules += [(rf"^layers/{i}/w$", (axis, None))]
  return tuple(rules)
