"""The planner's side of jdist's TOML configs: read a GPT and a batch from one, write a layout as one.

Both keep to one small function each, so they can follow the config schema as it grows: today's keys are
``[model]`` (``name = "gpt"`` and ``GPTConfig``'s fields), ``[data] batch_size``, ``[optimizer] name``,
``[strategy]`` (a name of ``jdist.experiment.STRATEGIES`` and its options) and ``[mesh]`` (axis sizes).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any, NamedTuple

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib

from jdist.analysis.plan._layout import Layout
from jdist.config import ConfigError

MODEL_KEYS = ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "compute_dtype", "remat", "attention_impl",
              "scan_unroll")


def read_plan_config(path: str | pathlib.Path) -> tuple[Any, int, str]:
  """``(GPTConfig, global batch, optimizer name)`` from a TOML file with ``[model] name = "gpt"`` and GPTConfig's
  keys, ``[data] batch_size`` and optionally ``[optimizer] name`` (default "adam").

  Raises:
    ConfigError: a missing file, another model, an unknown model key, or no batch size.
  """
  p = pathlib.Path(path)
  if not p.is_file():
    raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a TOML file with a [model] section for the GPT, "
                      f"e.g. examples/plan/gpt_7b.toml.")
  try:
    raw = tomllib.loads(p.read_text())
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path} is not valid TOML: {e}.") from None
  return plan_config_from_dict(raw, str(path))


def plan_config_from_dict(raw: dict, path: str = "config") -> tuple[Any, int, str]:
  """``read_plan_config`` on an already parsed TOML dict."""
  import jax.numpy as jnp

  from jdist.models import gpt

  model = dict(raw.get("model", {}))
  if model.pop("name", None) != "gpt":
    raise ConfigError(f"{path}: jdist plan compiles jdist's GPT: set [model] name = \"gpt\" and its sizes "
                      f"({', '.join(MODEL_KEYS[:5])}).")
  unknown = sorted(set(model) - set(MODEL_KEYS))
  if unknown:
    raise ConfigError(f"{path}: unknown key model.{unknown[0]}. Valid keys: {', '.join(MODEL_KEYS)}.")
  if "compute_dtype" in model:
    model["compute_dtype"] = jnp.dtype(model["compute_dtype"])
  batch = raw.get("data", {}).get("batch_size")
  if not isinstance(batch, int) or batch < 1:
    raise ConfigError(f"{path}: data.batch_size must be the global batch (sequences per step), got {batch!r}.")
  try:
    config = gpt.GPTConfig(**model)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{path}: [model]: {e}") from None
  return config, batch, raw.get("optimizer", {}).get("name", "adam")


def _toml_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return f'"{value}"'
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
  return repr(value)


def layout_config(layout: Layout, model: Any, batch: int, optimizer: str = "adam", *, header: str = "",
                  run_dir: str = "runs/plan") -> str:
  """``layout`` for jdist's GPT ``model`` as a ready TOML config (today's keys; see the module docstring)."""
  from jdist.models.gpt import TP_RULES

  lines = [f"# {line}" for line in header.splitlines()] + [f'run_dir = "{run_dir}"', "", "[model]", 'name = "gpt"']
  for key in MODEL_KEYS:
    value = getattr(model, key)
    value = layout.remat if key == "remat" else value
    if key == "compute_dtype":
      value = __import__("numpy").dtype(value).name
    if value != getattr(type(model)(), key) or key in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size"):
      lines.append(f"{key} = {_toml_value(value)}")
  # the bundled byte-level text (jdist.datasets.stdlib_text) in windows of the model's length: `jdist train` runs
  # the file as written; point [data] at your own tokens instead
  lines += ["", "[data]", 'name = "text"', f"seq_len = {model.seq_len}", f"batch_size = {batch}", "", "[optimizer]",
            f'name = "{optimizer}"', "", "[strategy]",
            f'name = "{layout.strategy}"']
  if layout.strategy == "data_parallel" and layout.microbatches > 1:
    lines.append(f"accumulate_steps = {layout.microbatches}")
  if layout.strategy == "sharded":
    if layout.fsdp > 1:
      lines.append('fsdp_axis = "fsdp"')
    if layout.model > 1:
      rules = [[pattern, [a or "" for a in spec]] for pattern, spec in TP_RULES]
      lines.append(f"rules = {_toml_value(rules)}")
  if layout.strategy == "pipeline":
    lines += [f"microbatches = {layout.microbatches}", 'schedule = "1f1b"']
    lines += ['data_axis = "data"'] if layout.data > 1 else []
  axes = layout.axes() or {"data": 1}
  lines += ["", "[mesh]"] + [f"{axis} = {size}" for axis, size in axes.items()]
  lines.append(f"cpu_devices = {layout.devices}   # emulated when the host has only a CPU")
  return "\n".join(lines) + "\n"


def model_fields(model: Any) -> dict[str, Any]:
  """GPTConfig as plain keywords (the dtype by name), for cache keys and subprocesses."""
  import numpy as np

  out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  out["compute_dtype"] = np.dtype(out["compute_dtype"]).name
  return out


class ConfiguredRun(NamedTuple):
  """What a planner-written config builds: the strategy, the GPT's config, the global batch, the function that
  turns ``gpt.init``'s parameters into the ones the strategy takes, and the optimizer."""

  strategy: Any
  model: Any
  batch: int
  to_params: Any
  optimizer: Any


def strategy_from_config(text: str, devices: Any = None) -> ConfiguredRun:
  """Builds the strategy a config written by ``layout_config`` describes, through jdist's own config code for the
  ``[optimizer]``, ``[strategy]`` and ``[mesh]`` sections (``jdist.config.from_dict``,
  ``jdist.experiment.build_strategy``). Until the config schema names the GPT, ``[model]`` is read here, and
  a pipeline is wired with ``gpt.pipeline_fns`` (``jdist train``'s pipeline builds the residual MLP only)."""
  import math

  import jax

  import jdist
  from jdist import config as config_lib
  from jdist.experiment import build_strategy
  from jdist.models import gpt

  raw = tomllib.loads(text)
  model, batch, _ = plan_config_from_dict(raw)
  cfg = config_lib.from_dict({k: raw[k] for k in ("optimizer", "strategy", "mesh") if k in raw})
  axes = dict(cfg.mesh.axes)
  devices = list(devices if devices is not None else jax.devices())[:math.prod(axes.values())]
  mesh = jdist.make_mesh(devices=devices, **axes)
  optimizer, options = cfg.optimizer.build(), dict(cfg.strategy.options)
  if cfg.strategy.name == "pipeline":
    stage_fn, loss, input_fn, to_pipeline = gpt.pipeline_fns(model)
    data_axis = options.pop("data_axis", "") or None
    strategy = jdist.pipeline(stage_fn, loss, optimizer, mesh, input_fn=input_fn, data_axis=data_axis, **options)
    return ConfiguredRun(strategy, model, batch, to_pipeline, optimizer)
  strategy = build_strategy(cfg.strategy.name, gpt.loss_fn(model), optimizer, mesh, options)
  return ConfiguredRun(strategy, model, batch, lambda params: params, optimizer)
