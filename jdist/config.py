"""Run configuration: TOML files read with the standard library into frozen dataclasses.

A file names the model, data, loss, optimizer, strategy, mesh, steps, checkpointing and logging;
``--set section.key=value`` overrides any entry (``--set optimizer.args.1.learning_rate.peak_value=1e-3`` reaches
into tables and lists). ``[model]``, ``[data]``, ``[loss]`` and ``[optimizer]`` each name a Python callable, and
their other keys are its keyword arguments (``jdist._config_calls``):

    [model]
    name = "mypkg.models:build"   # or a bundled one: mlp, resmlp, linear, gpt
    hidden = 256                  # build(key=..., hidden=256)

    [optimizer]
    name = "adamw"                # any function of optax, or an import path
    weight_decay = 0.01           # optax.adamw(learning_rate=..., weight_decay=0.01)
    learning_rate = { name = "cosine_decay_schedule", init_value = 3e-3, decay_steps = 400 }

Unknown keys are errors that list the valid keys (a callable's parameters) and suggest the closest one. See
examples/configs/ for one file per strategy, and ``jdist.experiment`` for how the callables are called.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

from jdist import _config_calls as calls
from jdist._config_calls import ConfigError, unknown_key

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib

DEFAULT_LR = 3e-3  # optimizer.learning_rate when an optimizer that takes one is given none


def _kwargs_field():
  return dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  name: str = "mlp"  # a bundled model (jdist.experiment.MODELS) or an import path "package.module:function"
  kwargs: Mapping[str, Any] = _kwargs_field()  # its keyword arguments: the other keys of [model]

  def __post_init__(self):
    _name_and_kwargs("model", self.name, self.kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  name: str = "digits"  # a bundled data set (jdist.experiment.DATASETS) or an import path
  batch_size: int = 128  # global batch, examples per step; divisible by the data-axis devices
  seed: int = 0  # shuffle seed (and the data function's `seed`, if it takes one)
  kwargs: Mapping[str, Any] = _kwargs_field()  # the data function's keyword arguments: the other keys of [data]

  def __post_init__(self):
    _name_and_kwargs("data", self.name, self.kwargs)
    _positive("data.batch_size", self.batch_size)
    _non_negative("data.seed", self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  name: str | None = None  # None: the model's own loss; else an import path to loss(params, batch[, key], **kwargs)
  kwargs: Mapping[str, Any] = _kwargs_field()  # bound to the loss: the other keys of [loss]

  def __post_init__(self):
    if self.name is not None or self.kwargs:
      _name_and_kwargs("loss", self.name, self.kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  name: str = "adam"  # any function of optax ("adamw", "chain", "contrib.muon") or an import path
  kwargs: Mapping[str, Any] = _kwargs_field()  # its keyword arguments; a table with a name is a call (a schedule)

  def __post_init__(self):
    _name_and_kwargs("optimizer", self.name, self.kwargs)

  def build(self):
    """The ``optax.GradientTransformation`` (nested calls made first; a learning rate defaults to ``DEFAULT_LR``)."""
    import optax

    fn = calls.resolve("optimizer.name", self.name, {}, what="a function of optax", namespace=optax)
    kwargs = with_default_lr(fn, self.kwargs)
    return calls.call(fn, {k: calls.build_optax_tree(v, optax) for k, v in kwargs.items()})


def with_default_lr(fn, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """``kwargs`` with ``lr`` spelt ``learning_rate``, and ``DEFAULT_LR`` added when ``fn`` takes a learning rate and
  none is given."""
  kwargs = dict(kwargs)
  sig = calls.Signature(fn)
  if "learning_rate" in sig.names:
    if "lr" in kwargs:
      if "learning_rate" in kwargs:
        raise ConfigError("optimizer.lr and optimizer.learning_rate are the same argument; give one.")
      kwargs["learning_rate"] = kwargs.pop("lr")
    kwargs.setdefault("learning_rate", DEFAULT_LR)
  return kwargs


def _name_and_kwargs(section: str, name: Any, kwargs: Any) -> None:
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(f"{section}.name must be a string: a name or an import path 'package.module:function', got "
                      f"{name!r}.")
  if not isinstance(kwargs, Mapping):
    raise ConfigError(f"{section}.kwargs must be a table of keyword arguments, got {kwargs!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StrategyConfig:
  name: str = "data_parallel"  # a key of jdist.experiment.STRATEGIES
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of the strategy
  seed: int | None = None  # the strategy's init key: async SGD's schedule, a takes_key loss's keys; None: train.seed

  def __post_init__(self):
    if self.seed is not None:
      _non_negative("strategy.seed", self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  axes: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})  # name -> size (-1: the rest)
  cpu_devices: int = 8  # CPU devices to emulate when the host has only a CPU
  num_devices: int = 0  # use the first this many devices (0: all of them)

  def __post_init__(self):
    _positive("mesh.cpu_devices", self.cpu_devices)
    if not isinstance(self.num_devices, int) or isinstance(self.num_devices, bool) or self.num_devices < 0:
      raise ConfigError(f"mesh.num_devices must be an int >= 0 (0: all devices), got {self.num_devices!r}.")
    for name, size in self.axes.items():
      if name == "devices":
        raise ConfigError("mesh.devices cannot name a mesh axis (make_mesh takes the device list under that name); "
                          "call the axis something else, e.g. mesh.data, or use mesh.num_devices to use fewer devices.")
      near = difflib.get_close_matches(name, ["cpu_devices", "num_devices"], n=1, cutoff=0.75)
      if near:  # a misspelt option would otherwise become a mesh axis, and every step would run on it
        raise ConfigError(f"mesh.{name} looks like a misspelt mesh.{near[0]}; the other keys of [mesh] are axis "
                          f"names. Did you mean mesh.{near[0]}?")
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ConfigError(f"mesh.{name} must be a positive int or -1, got {size!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  steps: int = 400  # total optimizer steps
  seed: int = 0  # parameter initialisation seed
  log_every: int = 10  # steps between metric log lines
  eval_every: int = 100  # steps between test-set evaluations
  progress: bool = True  # show a progress bar

  def __post_init__(self):
    _positive("train.steps", self.steps)
    _positive("train.log_every", self.log_every)
    _positive("train.eval_every", self.eval_every)
    _non_negative("train.seed", self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
  enabled: bool = True  # save checkpoints under run_dir/checkpoints and resume from them
  every_steps: int = 100  # steps between checkpoints
  every_seconds: float = 0.0  # also save after this many seconds (0: off)
  keep: int = 3  # newest checkpoints kept
  fallback: bool = False  # resume from the previous checkpoint if the latest is unreadable

  def __post_init__(self):
    _positive("checkpoint.every_steps", self.every_steps)
    _positive("checkpoint.keep", self.keep)
    if not self.every_seconds >= 0:
      raise ConfigError(f"checkpoint.every_seconds must be >= 0 (0: off), got {self.every_seconds!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  run_dir: str = "runs/default"  # metric logs, TensorBoard files and checkpoints go here
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)


SECTIONS = {"train": TrainConfig, "checkpoint": CheckpointSection}  # fixed keys
CALL_SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optimizer": OptimizerConfig}
OPEN_SECTIONS = ("strategy", "mesh")  # keys beyond the fixed ones are strategy options / mesh axes


def _positive(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{name} must be a positive int, got {value!r}.")


def _non_negative(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"{name} must be an int >= 0, got {value!r}.")


_ALIASES = {"num_steps": "steps", "lr": "learning_rate"}  # names from other libraries
_TOP_LEVEL_HINTS = {"learning_rate": "optimizer.learning_rate", "batch_size": "data.batch_size"}


def _unknown(where: str, key: str, valid: Sequence[str]) -> ConfigError:
  name = _ALIASES.get(key, key)
  hint = [name] if name in valid and name != key else difflib.get_close_matches(key, list(valid), n=1)
  if not where and not hint:  # a section's key given at the top level: steps=5 for train.steps=5
    hint = sorted(f"{section}.{name}" for section, cls in {**SECTIONS, **CALL_SECTIONS}.items()
                  if name in _field_names(cls) and name not in ("name", "kwargs"))
    hint = hint or ([_TOP_LEVEL_HINTS[name]] if name in _TOP_LEVEL_HINTS else [])
  return unknown_key(where, key, valid, hint)


def _field_names(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


_KINDS = {"bool": "true or false (lowercase, as TOML writes them)", "int": "an integer", "float": "a number",
          "str": 'a string (quoted in a TOML file: "...")'}


def _typed(where: str, value: Any, annotation: str) -> Any:
  """``value`` checked against a field's annotation: a bool only for a bool field (``False``, which is
  not TOML, arrives as a string and must not count as true), no bool for a number, an int accepted as
  a float. Tuples and tables are checked by their dataclasses."""
  if annotation.endswith(" | None"):  # an optional field (None: not given); TOML itself has no null
    if value is None:
      return value
    annotation = annotation[:-len(" | None")]
  if annotation not in _KINDS:
    return value
  if annotation == "bool":
    ok = isinstance(value, bool)
  else:
    ok = isinstance(value, {"int": int, "float": (int, float), "str": str}[annotation]) and not isinstance(value, bool)
  if not ok:
    raise ConfigError(f"{where} must be {_KINDS[annotation]}, got {value!r}.")
  return float(value) if annotation == "float" else value


def _section(cls, name: str, raw: Any):
  if not isinstance(raw, dict):
    raise ConfigError(f"[{name}] must be a table of keys, got {raw!r}.")
  types = {f.name: f.type for f in dataclasses.fields(cls)}
  for key in raw:
    if key not in types:
      raise _unknown(f"in [{name}]: ", key, list(types))
  raw = {key: _typed(f"{name}.{key}", value, types[key]) for key, value in raw.items()}
  try:
    return cls(**raw)
  except TypeError as e:
    raise ConfigError(f"[{name}]: {e}") from None


def _call_section(name: str, raw: Any):
  """A section that names a callable: jdist's own keys (``name``, ``data.batch_size``, ...) typed, the rest the
  callable's keyword arguments (checked against it by ``check_calls``)."""
  if not isinstance(raw, dict):
    raise ConfigError(f"[{name}] must be a table of keys, got {raw!r}; set one of its keys instead, e.g. "
                      f"{name}.name=...")
  cls = CALL_SECTIONS[name]
  own = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "kwargs"}
  given = {key: _typed(f"{name}.{key}", value, own[key]) for key, value in raw.items() if key in own}
  return cls(**given, kwargs={key: value for key, value in raw.items() if key not in own})


def from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds a ``Config`` from a nested dict (as read from TOML), rejecting unknown keys; the callables the
  sections name are imported and their keyword arguments checked (``check_calls``)."""
  valid_top = _field_names(Config)
  kwargs: dict[str, Any] = {}
  for key, value in raw.items():
    if key not in valid_top:
      raise _unknown("", key, valid_top)
    if key in SECTIONS:
      kwargs[key] = _section(SECTIONS[key], key, value)
    elif key in CALL_SECTIONS:
      kwargs[key] = _call_section(key, value)
    elif key in OPEN_SECTIONS and not isinstance(value, dict):
      raise ConfigError(f"[{key}] must be a table of keys, got {value!r}; set one of its keys instead, e.g. "
                        + ("strategy.name=data_parallel." if key == "strategy" else "mesh.data=8."))
    elif key == "strategy":
      value = dict(value)
      name = _typed("strategy.name", value.pop("name", "data_parallel"), "str")
      kwargs[key] = StrategyConfig(name=name, seed=value.pop("seed", None), options=value)
    elif key == "mesh":
      value = dict(value)
      cpu = value.pop("cpu_devices", 8)
      num = value.pop("num_devices", 0)
      kwargs[key] = MeshConfig(axes=value or {"data": -1}, cpu_devices=cpu, num_devices=num)
    else:
      kwargs[key] = _typed(key, value, "str")  # run_dir
      if not kwargs[key].strip():  # "" would put the logs and checkpoints in whatever directory jdist runs in
        raise ConfigError(f"run_dir must name a directory for the run's logs and checkpoints, got {value!r}; "
                          f"e.g. run_dir = \"runs/my_run\" (--set run_dir=runs/my_run).")
  return check_calls(Config(**kwargs))


# hyperparameters checked wherever an [optimizer] table gives them: (low, low included, high) and the words
_RANGES = {"learning_rate": (0.0, False, math.inf, "> 0"), "lr": (0.0, False, math.inf, "> 0"),
           "momentum": (0.0, True, 1.0, "in [0, 1)"), "weight_decay": (0.0, True, math.inf, ">= 0"),
           "b1": (0.0, True, 1.0, "in [0, 1)"), "b2": (0.0, True, 1.0, "in [0, 1)"),
           "max_norm": (0.0, False, math.inf, "> 0")}


def _check_hyperparameters(section: str, kwargs: Mapping[str, Any]) -> None:
  for key, value in kwargs.items():
    if key in _RANGES and not calls.is_call(value):
      low, closed, high, words = _RANGES[key]
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{section}.{key} must be a number" + (" or a schedule table (name = ...)"
                          if key in ("learning_rate", "lr") else "") + f", got {value!r}.")
      if not ((value >= low if closed else value > low) and value < high):
        raise ConfigError(f"{section}.{key} must be {words}, got {value!r}.")
    elif calls.is_call(value):
      _check_hyperparameters(f"{section}.{key}", {k: v for k, v in value.items() if k != "name"})
    elif isinstance(value, list):
      for i, item in enumerate(value):
        if calls.is_call(item):
          _check_hyperparameters(f"{section}.{key}.{i}", {k: v for k, v in item.items() if k != "name"})


def check_calls(config: Config) -> Config:
  """Imports the callables ``config`` names and checks their keyword arguments; returns the config with the
  optimizer's learning rate spelt ``learning_rate`` (``lr`` is accepted) and defaulted (``DEFAULT_LR``)."""
  import optax

  from jdist import experiment  # the bundled models and data sets (it imports JAX and starts no backend)
  from jdist.strategy import KeyedLoss

  m = config.model
  fn = calls.resolve("model.name", m.name, experiment.MODELS, what="a bundled model")
  sig = calls.Signature(fn)
  calls.check_keys(f"name = {m.name!r}", "model", sig, m.kwargs, ("name",), given=("key",) if sig.takes("key") else ())
  d = config.data
  sig = calls.Signature(calls.resolve("data.name", d.name, experiment.DATASETS, what="a bundled data set"))
  calls.check_keys(f"name = {d.name!r}", "data", sig, d.kwargs, ("name", "batch_size", "seed"),
                   given=("seed",) if sig.takes("seed") else ())
  if config.loss.name is not None:
    fn = calls.resolve("loss.name", config.loss.name, {}, what="an import path")
    keyed = isinstance(fn, KeyedLoss)  # jdist.takes_key(loss): called with params, batch, key
    calls.check_keys(f"name = {config.loss.name!r}", "loss", calls.Signature(fn.fn if keyed else fn, 3 if keyed else 2),
                     config.loss.kwargs, ("name",))
  o = config.optimizer
  fn = calls.resolve("optimizer.name", o.name, {}, what="a function of optax (e.g. 'adam', 'adamw', 'sgd', "
                     "'chain')", namespace=optax)
  _check_hyperparameters("optimizer", o.kwargs)
  kwargs = with_default_lr(fn, o.kwargs)
  calls.check_keys(f"name = {o.name!r}", "optimizer", calls.Signature(fn), kwargs, ("name",), namespace=optax)
  for key, value in kwargs.items():
    calls.check_optax_tree(f"optimizer.{key}", value, optax)
  return dataclasses.replace(config, optimizer=OptimizerConfig(name=o.name, kwargs=kwargs))


def to_dict(config: Config) -> dict[str, Any]:
  """``config`` as the nested dict a TOML file would give (``from_dict(to_dict(c)) == c``), every default filled
  in: what ``jdist train`` saves as ``run_dir/config.toml``."""
  out: dict[str, Any] = {"run_dir": config.run_dir}
  for name in CALL_SECTIONS:
    section = getattr(config, name)
    if name == "loss" and section.name is None:
      continue
    own = {f: getattr(section, f) for f in _field_names(type(section)) if f != "kwargs"}
    out[name] = {**own, **section.kwargs}
  s = config.strategy
  out["strategy"] = {"name": s.name, **({"seed": s.seed} if s.seed is not None else {}), **s.options}
  out["mesh"] = {**config.mesh.axes, "cpu_devices": config.mesh.cpu_devices, "num_devices": config.mesh.num_devices}
  out["train"] = dataclasses.asdict(config.train)
  out["checkpoint"] = dataclasses.asdict(config.checkpoint)
  return _plain(out)


def _plain(value: Any) -> Any:
  """Mappings as dicts and tuples as lists (as TOML reads them back)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def dumps(raw: Mapping[str, Any]) -> str:
  """A nested dict as TOML: top-level values, then one ``[section]`` per table (deeper tables inline)."""
  lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, Mapping)]
  for k, v in raw.items():
    if isinstance(v, Mapping):
      lines += ["", f"[{_toml_key(k)}]", *(f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items())]
  return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
  return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return "nan" if value != value else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
  if isinstance(value, str):
    return json.dumps(value)
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
  if isinstance(value, Mapping):
    return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
  raise ConfigError(f"A config value of type {type(value).__name__} ({value!r}) cannot be written as TOML.")


# what may change when a run resumes without --allow-config-change: how long, how often it logs and saves, how many
# CPU devices are emulated (the mesh is fixed by its axes); everything else changes what is computed
RESUMABLE = ("run_dir", "train.steps", "train.log_every", "train.eval_every", "train.progress", "checkpoint.",
             "mesh.cpu_devices")


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old, new)}`` for every key whose value differs (a key only on one side: None on the other)."""
  out: dict[str, tuple[Any, Any]] = {}
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out.update(differences(a, b, f"{prefix}{key}."))
    elif a != b:
      out[f"{prefix}{key}"] = (a, b)
  return out


def run_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """The ``differences`` that change what a resumed run computes (all but ``RESUMABLE``)."""
  return {k: v for k, v in differences(old, new).items()
          if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)}


def parse_value(text: str) -> Any:
  """A TOML value (``0.1``, ``true``, ``[64, 64]``, ``"adam"``, ``{name = "x"}``), or the bare text as a string."""
  try:
    return tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], unset: Sequence[str] = ()) -> dict[str, Any]:
  """Removes the ``unset`` keys (``section.key``, as if the file did not set them), then applies
  ``section.key=value`` overrides, on a copy of a nested dict. A path reaches into tables and lists (numbers index
  a list): ``optimizer.args.1.learning_rate.peak_value=1e-3``; a string where a table is needed becomes the table
  ``{name = string}`` (``reducer = "powersgd"`` then ``strategy.reducer.rank=4``)."""
  out = _copy_tables(raw)
  for item in unset:
    *parents, key = item.strip().split(".")
    table = _table_at(out, parents)
    if isinstance(table, list) and key.isdigit() and int(key) < len(table):
      del table[int(key)]
      continue
    if not isinstance(table, dict) or key not in table:
      raise ConfigError(f"--unset {item}: the config does not set {item!r}, so there is nothing to remove. Give a "
                        f"key the file sets, as section.key (e.g. optimizer.momentum).")
    del table[key]
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override {item!r} is not of the form section.key=value, e.g. optimizer.lr=0.1.")
    path, value = item.split("=", 1)
    *parents, key = path.strip().split(".")
    if parents and parents[0] not in (*SECTIONS, *CALL_SECTIONS, *OPEN_SECTIONS):
      raise _unknown("", parents[0], _field_names(Config))
    table: Any = out
    for i, name in enumerate(parents):
      table = _child(table, name, f"Override {item!r}: {'.'.join(parents[:i + 1])}")
    if isinstance(table, list):
      _index(table, key, f"Override {item!r}")
      table[int(key)] = parse_value(value)
    else:
      table[key] = parse_value(value)
  return out


def _child(table: Any, name: str, where: str) -> Any:
  """The table (or list) under ``name`` in ``table``, made if missing; a string there becomes ``{name = ...}``."""
  if isinstance(table, list):
    return table[_index(table, name, where)]
  current = table.get(name, {})
  if isinstance(current, str):
    current = {"name": current}
  if not isinstance(current, (dict, list)):
    raise ConfigError(f"{where} is {current!r}, not a table.")
  table[name] = current
  return current


def _index(items: list, name: str, where: str) -> int:
  if not name.isdigit() or int(name) >= len(items):
    raise ConfigError(f"{where}: {name!r} is not an index of the list there (0 to {len(items) - 1}).")
  return int(name)


def _copy_tables(raw: Any) -> Any:
  """A copy of ``raw`` in which every nested table and list is new (overrides never touch the caller's)."""
  if isinstance(raw, Mapping):
    return {k: _copy_tables(v) for k, v in raw.items()}
  if isinstance(raw, list):
    return [_copy_tables(v) for v in raw]
  return raw


def _table_at(out: dict[str, Any], parts: Sequence[str]) -> Any:
  """The table or list at ``parts`` (``["strategy", "reducer"]``; ``[]``: the top level), or None."""
  table: Any = out
  for part in parts:
    if isinstance(table, list):
      table = table[int(part)] if part.isdigit() and int(part) < len(table) else None
    else:
      table = table.get(part) if isinstance(table, dict) else None
  return table


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
  """A TOML file as a dict; a missing file, a directory or bad TOML is a ``ConfigError``."""
  p = pathlib.Path(path)
  if p.is_dir():
    raise ConfigError(f"Config file {str(path)!r} is a directory. Pass a TOML file, e.g. "
                      f"examples/configs/data_parallel.toml.")
  if not p.is_file():
    raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a TOML file, e.g. "
                      f"examples/configs/data_parallel.toml.")
  try:
    return tomllib.loads(p.read_text())
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"{path} is not valid TOML: {e}.") from None


def load(path: str | os.PathLike | None, overrides: Sequence[str] = (), unset: Sequence[str] = ()) -> Config:
  """Reads a TOML config file (or the defaults when ``path`` is None), removes the ``unset`` keys and applies
  the overrides."""
  raw = read_toml(path) if path is not None else {}
  return from_dict(apply_overrides(raw, overrides, unset))
