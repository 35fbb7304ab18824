"""What a model callable named in a config's ``[model]`` returns: its parameters and the functions that use them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence


class Pipelined(NamedTuple):
  """The model as ``jdist.pipeline`` takes it (``strategy.name = "pipeline"``).

  Attributes:
    stage_fn: ``stage_fn(layer_params, x) -> x`` for one stacked layer.
    loss_fn: ``loss_fn(params, y, batch) -> scalar`` after the last layer.
    input_fn: ``input_fn(params, batch) -> x`` before the first layer (None: ``batch["x"]``).
    to_pipeline: ``params -> {"stages": stacked layers, ...}`` (None: the params are already so).
    from_pipeline: the inverse, for ``Model.eval`` (None: the identity).
  """

  stage_fn: Callable
  loss_fn: Callable
  input_fn: Callable | None = None
  to_pipeline: Callable | None = None
  from_pipeline: Callable | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
  """A model for ``jdist train``: ``[model] name = "mypkg.models:build"`` calls ``build(key=..., **the other keys)``
  (``key`` only if it takes one: ``jax.random.key(train.seed)``), which returns a ``Model`` (or a pair
  ``(params, loss)``, or the params alone with a ``[loss]`` section).

  Attributes:
    params: the initial parameters, any pytree of float arrays (a dict, flax NNX state from ``nnx.split``).
    loss: ``loss(params, batch) -> scalar`` mean loss, or ``jdist.takes_key(loss)`` for ``loss(params, batch,
      key)`` (dropout); None if ``[loss]`` names one.
    eval: ``eval(params, batch) -> dict of scalars`` on the test data (None: the loss, for a loss without a key).
    rules: tensor-parallel sharding rules, used by ``strategy.rules = "tp"`` (e.g. ``jdist.rules_from_flax``).
    pipeline: the model as stages, for ``strategy.name = "pipeline"``.
    flops_per_example: model FLOPs of one training example (None: 6 x parameters), for MFU in timing.jsonl.
  """

  params: Any
  loss: Callable | None = None
  eval: Callable | None = None
  rules: Sequence[tuple[str, Any]] = ()
  pipeline: Pipelined | None = None
  flops_per_example: float | None = None
