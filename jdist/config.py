"""Run configuration: TOML files read with the standard library into frozen dataclasses.

A file names the model, data, optimizer, strategy, mesh, steps, checkpointing and logging;
``--set section.key=value`` overrides any entry. Unknown keys are errors that list the valid keys and
suggest the closest one. See examples/configs/ for one file per strategy.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib


class ConfigError(ValueError):
  """A configuration file or override is invalid; the message says what to change."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  name: str = "mlp"  # "mlp" or "resmlp" (digits classifiers) or "linear" (regression)
  hidden: tuple[int, ...] | None = None  # hidden widths (default [128]); for "resmlp" one per residual layer, all equal

  def __post_init__(self):
    _one_of("model.name", self.name, ("mlp", "resmlp", "linear"))
    if self.hidden is None:
      return
    if self.name == "linear":  # no hidden layers: only [] says that
      if self.hidden not in ([], ()):
        shown = list(self.hidden) if isinstance(self.hidden, (list, tuple)) else repr(self.hidden)
        raise ConfigError(f"model.hidden = {shown} is for the classifiers (model.name = 'mlp' or 'resmlp'); the "
                          f"'linear' model has no hidden layers. Drop model.hidden (CLI: --unset model.hidden, or "
                          f"--set model.hidden=[]) or pick a classifier.")
      object.__setattr__(self, "hidden", ())
      return
    if not isinstance(self.hidden, (list, tuple)):
      raise ConfigError(f"model.hidden must be a list of positive ints, e.g. [128, 64], got {self.hidden!r}.")
    if self.name == "resmlp" and len(set(self.hidden)) != 1:
      raise ConfigError(f"model.hidden for 'resmlp' lists one equal width per residual layer, got {list(self.hidden)}.")
    object.__setattr__(self, "hidden", tuple(self.hidden))
    if any((not isinstance(h, int)) or h < 1 for h in self.hidden):
      raise ConfigError(f"model.hidden must be a list of positive ints, got {list(self.hidden)}.")

  @property
  def widths(self) -> tuple[int, ...]:
    """The hidden widths the model is built with: ``hidden``, or (128,) when not given."""
    return (128,) if self.hidden is None else self.hidden


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  name: str = "digits"  # "digits" (sklearn's 8x8 digits) or "linear_regression" (x = 1..8, y = 2x + 1)
  batch_size: int = 128  # global batch, examples per step; divisible by the data-axis devices
  seed: int = 0  # shuffle and train/test split seed

  def __post_init__(self):
    _one_of("data.name", self.name, ("digits", "linear_regression"))
    _positive("data.batch_size", self.batch_size)
    _non_negative("data.seed", self.seed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  name: str = "adam"  # "sgd", "momentum", "adam" or "adamw"
  lr: float = 3e-3  # learning rate, > 0
  momentum: float | None = None  # for "momentum" (default 0.9)
  weight_decay: float | None = None  # for "adamw" (default 1e-4)

  def __post_init__(self):
    _one_of("optimizer.name", self.name, ("sgd", "momentum", "adam", "adamw"))
    if not self.lr > 0:
      raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}.")
    for key, owner in (("momentum", "momentum"), ("weight_decay", "adamw")):
      if getattr(self, key) is not None and self.name != owner:
        raise ConfigError(f"optimizer.{key} is used by optimizer.name = {owner!r} only, but the name is "
                          f"{self.name!r}, which would ignore it. Set name = {owner!r}, or drop {key} (CLI: "
                          f"--unset optimizer.{key}).")
    if self.momentum is not None and not 0 <= self.momentum < 1:
      raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}.")
    if self.weight_decay is not None and not self.weight_decay >= 0:
      raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}.")

  def build(self):
    import optax

    momentum = 0.9 if self.momentum is None else self.momentum
    weight_decay = 1e-4 if self.weight_decay is None else self.weight_decay
    return {"sgd": lambda: optax.sgd(self.lr), "momentum": lambda: optax.sgd(self.lr, momentum=momentum),
            "adam": lambda: optax.adam(self.lr),
            "adamw": lambda: optax.adamw(self.lr, weight_decay=weight_decay)}[self.name]()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StrategyConfig:
  name: str = "data_parallel"  # a key of jdist.experiment.STRATEGIES
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of the strategy
  seed: int | None = None  # the strategy's randomness (its init key: async SGD's schedule); None: train.seed

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
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "train": TrainConfig,
            "checkpoint": CheckpointSection}
OPEN_SECTIONS = ("strategy", "mesh")  # keys beyond the fixed ones are strategy options / mesh axes


def _one_of(name: str, value: Any, valid: Sequence[str]) -> None:
  if value not in valid:
    hint = difflib.get_close_matches(str(value), valid, n=1)
    raise ConfigError(f"Unknown {name}: {value!r}. It needs to be one of {list(valid)}"
                      + (f"; did you mean {hint[0]!r}?" if hint else "."))


def _positive(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{name} must be a positive int, got {value!r}.")


def _non_negative(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"{name} must be an int >= 0, got {value!r}.")


_ALIASES = {"learning_rate": "lr", "num_steps": "steps"}  # names from other libraries


def _unknown(where: str, key: str, valid: Sequence[str]) -> ConfigError:
  name = _ALIASES.get(key, key)
  hint = [name] if name in valid and name != key else difflib.get_close_matches(key, list(valid), n=1)
  if not where and not hint:  # a section's key given at the top level: steps=5 for train.steps=5
    hint = [f"{section}.{name}" for section, cls in SECTIONS.items() if name in _field_names(cls)]
  return ConfigError(f"Unknown key {where}{key!r}. Valid keys: {', '.join(sorted(valid))}"
                     + (f". Did you mean {' or '.join(map(repr, hint))}?" if hint else "."))


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


def from_dict(raw: Mapping[str, Any]) -> Config:
  """Builds a ``Config`` from a nested dict (as read from TOML), rejecting unknown keys."""
  valid_top = _field_names(Config)
  kwargs: dict[str, Any] = {}
  for key, value in raw.items():
    if key not in valid_top:
      raise _unknown("", key, valid_top)
    if key in SECTIONS:
      kwargs[key] = _section(SECTIONS[key], key, value)
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
  return Config(**kwargs)


def parse_value(text: str) -> Any:
  """A TOML value (``0.1``, ``true``, ``[64, 64]``, ``"adam"``), or the bare text as a string."""
  try:
    return tomllib.loads(f"v = {text}")["v"]
  except tomllib.TOMLDecodeError:
    return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], unset: Sequence[str] = ()) -> dict[str, Any]:
  """Removes the ``unset`` keys (``section.key``, as if the file did not set them), then applies
  ``section.key=value`` overrides, on a copy of a nested dict. A strategy option that is a table takes a third
  part, ``strategy.reducer.rank=4`` (a reducer given by name, ``reducer = "powersgd"``, becomes the table
  ``{name = "powersgd"}`` first)."""
  out = _copy_tables(raw)
  for item in unset:
    *section, key = item.strip().split(".")
    table = _table_at(out, section)
    if not isinstance(table, dict) or key not in table:
      raise ConfigError(f"--unset {item}: the config does not set {item!r}, so there is nothing to remove. Give a "
                        f"key the file sets, as section.key (e.g. optimizer.momentum).")
    del table[key]
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"Override {item!r} is not of the form section.key=value, e.g. optimizer.lr=0.1.")
    path, value = item.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) == 1:
      out[parts[0]] = parse_value(value)
    elif len(parts) == 2 or (len(parts) == 3 and parts[0] == "strategy"):
      section, *tables, key = parts
      if section not in SECTIONS and section not in OPEN_SECTIONS:
        raise _unknown("", section, _field_names(Config))
      if not isinstance(out.setdefault(section, {}), dict):
        raise ConfigError(f"{section} is not a section.")
      table = out[section]
      for name in tables:  # strategy.reducer: a name given as a string becomes {name = ...}
        current = table.get(name, {})
        table[name] = {"name": current} if isinstance(current, str) else current
        if not isinstance(table[name], dict):
          raise ConfigError(f"Override {item!r}: {section}.{name} is {current!r}, not a table.")
        table = table[name]
      table[key] = parse_value(value)
    else:
      raise ConfigError(f"Override {item!r}: keys have at most two parts (section.key), three for a strategy "
                        f"option's table (strategy.reducer.rank).")
  return out


def _copy_tables(raw: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of ``raw`` in which every nested table is a new dict (overrides never touch the caller's)."""
  return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _table_at(out: dict[str, Any], parts: Sequence[str]) -> Any:
  """The table at ``parts`` (``["strategy", "reducer"]``; ``[]``: the top level), or None."""
  table: Any = out
  for part in parts:
    table = table.get(part) if isinstance(table, dict) else None
  return table


def load(path: str | os.PathLike | None, overrides: Sequence[str] = (), unset: Sequence[str] = ()) -> Config:
  """Reads a TOML config file (or the defaults when ``path`` is None), removes the ``unset`` keys and applies
  the overrides."""
  raw: dict[str, Any] = {}
  if path is not None:
    p = pathlib.Path(path)
    if p.is_dir():
      raise ConfigError(f"Config file {str(path)!r} is a directory. Pass a TOML file, e.g. "
                        f"examples/configs/data_parallel.toml.")
    if not p.is_file():
      raise ConfigError(f"Config file {str(path)!r} does not exist. Pass a TOML file, e.g. "
                        f"examples/configs/data_parallel.toml.")
    try:
      raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
      raise ConfigError(f"{path} is not valid TOML: {e}.") from None
  return from_dict(apply_overrides(raw, overrides, unset))
