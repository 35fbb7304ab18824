"""The bundled models as config callables (``[model] name = "mlp"``): each returns a ``Model``."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jdist._config_calls import ConfigError
from jdist.models import gpt, linear, mlp, resmlp
from jdist.models._model import Model, Pipelined


def _widths(hidden: Any, who: str) -> tuple[int, ...]:
  if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                                       for h in hidden):
    raise ConfigError(f"model.hidden must be a list of positive ints, e.g. [128, 64], got {hidden!r}.")
  if who == "resmlp" and len(set(hidden)) != 1:
    raise ConfigError(f"model.hidden for 'resmlp' lists one equal width per residual layer, got {list(hidden)}.")
  return tuple(hidden)


def _classifier_eval(module):
  def eval_fn(params, batch):
    loss, aux = module.loss_and_accuracy(params, batch)
    return {"loss": loss, **aux}
  return eval_fn


def mlp_model(key: jax.Array, *, hidden: Sequence[int] = (128,), in_features: int = 64, classes: int = 10) -> Model:
  """The MLP classifier (default: scikit-learn's 8x8 digits, 64 inputs, 10 classes); its Megatron TP rules."""
  hidden = _widths(hidden, "mlp")
  return Model(params=mlp.init(key, [in_features, *hidden, classes]), loss=mlp.loss, eval=_classifier_eval(mlp),
               rules=mlp.tp_rules(len(hidden) + 1))


def resmlp_model(key: jax.Array, *, hidden: Sequence[int] = (128,), in_features: int = 64,
                 classes: int = 10) -> Model:
  """The residual MLP: one residual layer per entry of ``hidden`` (all equal), the pipeline's stages."""
  hidden = _widths(hidden, "resmlp")
  stage, head_loss, embed = resmlp.pipeline_fns()
  return Model(params=resmlp.init(key, in_features, hidden[0], len(hidden), classes), loss=resmlp.loss,
               eval=_classifier_eval(resmlp), pipeline=Pipelined(stage, head_loss, embed))


def linear_model() -> Model:
  """The seed article's ``y = w x + b`` (zeros), for ``data.name = "linear_regression"``."""
  return Model(params=linear.init(in_features=1), loss=linear.loss, eval=lambda p, b: {"loss": linear.loss(p, b)})


def gpt_model(key: jax.Array, **options: Any) -> Model:
  """The GPT (``jdist.models.gpt``): the keys of ``GPTConfig`` (``compute_dtype`` by name, e.g. "bfloat16"), for
  byte-level text (``data.name = "text"``); its TP rules and pipeline stages."""
  if isinstance(options.get("compute_dtype"), str):
    try:
      options["compute_dtype"] = jnp.dtype(options["compute_dtype"])
    except TypeError:
      raise ConfigError(f"model.compute_dtype must name a dtype, e.g. \"float32\" or \"bfloat16\", got "
                        f"{options['compute_dtype']!r}.") from None
  try:
    cfg = gpt.GPTConfig(**options)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model (gpt): {e}") from None
  stage, head_loss, embed, to_pipeline = gpt.pipeline_fns(cfg)
  from_pipeline = lambda p: {"blocks": p["stages"], "wte": p["wte"], "wpe": p["wpe"], "lnf": p["lnf"]}
  return Model(params=gpt.init(key, cfg), loss=gpt.loss_fn(cfg), eval=lambda p, b: {"loss": gpt.loss(p, b, cfg)},
               rules=gpt.TP_RULES, pipeline=Pipelined(stage, head_loss, embed, to_pipeline, from_pipeline),
               flops_per_example=gpt.flops_per_token(cfg) * cfg.seq_len)


# the config's keys are GPTConfig's fields (checked when the config is read), compute_dtype spelt as a string
gpt_model.__signature__ = inspect.Signature(
    [inspect.Parameter("key", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                         default="float32" if f.name == "compute_dtype" else f.default)
       for f in dataclasses.fields(gpt.GPTConfig)])

MODELS = {"mlp": mlp_model, "resmlp": resmlp_model, "linear": linear_model, "gpt": gpt_model}
