"""From a ``Config`` to a finished run: builds the model, data, optimizer, mesh and strategy, then fits.

The CLI only parses arguments into a ``Config`` and calls ``run``. New strategies plug in by adding an
entry to ``STRATEGIES``: ``name -> builder(loss_fn, optimizer, mesh, **options) -> Strategy``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from jdist import datasets, reducers
from jdist.config import Config, ConfigError
from jdist.data import ArrayLoader
from jdist.errors import IdleAxesError, OptionError, OptionTypeError
from jdist.mesh import make_mesh
from jdist.models import linear, mlp, resmlp
from jdist.strategies.async_sgd import async_sgd, split_workers
from jdist.strategies.data_parallel import data_parallel
from jdist.strategies.local_sgd import local_sgd
from jdist.strategies.model_parallel import DEFAULT_FSDP_MIN_SIZE, fsdp, sharded
from jdist.strategies.pipeline import pipeline
from jdist.strategy import Strategy
from jdist.train import CheckpointConfig, NanGuard, PrintLogger, ProgressBar, fit


# A [strategy.reducer] table: name, and the keys each reducer takes (algorithm and bucket_bytes are the exact mean's,
# inside bf16 and powersgd too)
REDUCER_KEYS = {"mean": ("algorithm", "bucket_bytes"), "bf16": ("algorithm", "bucket_bytes"), "int8": (),
                "powersgd": ("rank", "stacked", "algorithm", "bucket_bytes")}
# the options data_parallel had before reducers, and where each lives now
MOVED_TO_REDUCER = {"allreduce": "algorithm", "bucket_bytes": "bucket_bytes", "compression": "name",
                    "powersgd_rank": "rank", "powersgd_stacked": "stacked"}


def reducer_from_config(spec: str | Mapping[str, Any]) -> reducers.Reducer:
  """A reducer from a config's ``strategy.reducer``: a name (``"int8"``) or a table of ``name`` (default "mean")
  and its keys (``REDUCER_KEYS``), e.g. ``{name = "powersgd", rank = 4, algorithm = "ring"}``."""
  if not isinstance(spec, (str, Mapping)):
    raise ConfigError(f"strategy.reducer must be a reducer's name ({', '.join(map(repr, REDUCER_KEYS))}) or a "
                      f"[strategy.reducer] table, got {spec!r}.")
  table = {"name": spec} if isinstance(spec, str) else dict(spec)
  name = table.pop("name", "mean")
  if name not in REDUCER_KEYS:
    hint = difflib.get_close_matches(str(name), list(REDUCER_KEYS), n=1)
    raise ConfigError(f"Unknown strategy.reducer.name {name!r}. It needs to be one of {list(REDUCER_KEYS)}"
                      + (f"; did you mean {hint[0]!r}?" if hint else "."))
  valid = ("name", *REDUCER_KEYS[name])
  for key in table:
    if key not in valid:
      hint = difflib.get_close_matches(key, valid, n=1)
      takers = [n for n, keys in REDUCER_KEYS.items() if key in keys]
      raise ConfigError(f"Unknown key {key!r} in [strategy.reducer] for name = {name!r}. Valid keys: {', '.join(valid)}"
                        + (f". Did you mean {hint[0]!r}?" if hint else
                           f"; {key!r} is for name = {' or '.join(map(repr, takers))}." if takers else "."))
  try:
    inner = reducers.mean(table.get("algorithm", "psum"), bucket_bytes=table.get("bucket_bytes"))
    if name == "powersgd":
      return reducers.powersgd(table.get("rank", 1), stacked=table.get("stacked", ()), inner=inner)
    return {"mean": lambda: inner, "bf16": lambda: reducers.bf16(inner), "int8": reducers.int8}[name]()
  except (OptionError, OptionTypeError) as e:  # the message starts with the option's name: give its config key
    raise ConfigError(f"strategy.reducer.{e}") from None


def data_parallel_from_config(loss_fn, optimizer, mesh, *, axis: str | list[str] = "data", backend: str = "shard_map",
                              accumulate_steps: int = 1, reducer: str | dict = "mean") -> Strategy:
  """``data_parallel`` with its reducer given as a name or a table (``reducer_from_config``)."""
  axis = tuple(axis) if isinstance(axis, list) else axis
  return data_parallel(loss_fn, optimizer, mesh, axis=axis, backend=backend, accumulate_steps=accumulate_steps,
                       reducer=reducer_from_config(reducer))


def local_sgd_from_config(loss_fn, optimizer, mesh, *, axis: str = "data", sync_every: int = 4,
                          reducer: str | dict = "mean", outer_lr: float | None = None,
                          outer_momentum: float | None = None, outer_nesterov: bool | None = None) -> Strategy:
  """``local_sgd`` with its outer optimizer given as numbers (TOML cannot hold an optax object).

  ``outer_lr`` None is plain averaging; else the outer optimizer is SGD(outer_lr, outer_momentum,
  nesterov), e.g. DiLoCo's 0.7 / 0.9 / true. ``outer_momentum`` and ``outer_nesterov`` without ``outer_lr``
  (and Nesterov without momentum) are errors: they would change nothing. ``reducer``: a name or a table
  (``reducer_from_config``).
  """
  number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
  if outer_lr is not None and not (number(outer_lr) and outer_lr > 0):
    raise ConfigError(f"strategy.outer_lr must be a number > 0 (DiLoCo uses 0.7; leave it out for plain averaging), "
                      f"got {outer_lr!r}.")
  if outer_momentum is not None and not (number(outer_momentum) and 0 <= outer_momentum < 1):
    raise ConfigError(f"strategy.outer_momentum must be a number in [0, 1) (DiLoCo uses 0.9), got {outer_momentum!r}.")
  if outer_nesterov is not None and not isinstance(outer_nesterov, bool):
    raise ConfigError(f"strategy.outer_nesterov must be true or false, got {outer_nesterov!r}.")
  # outer_momentum = 0 and outer_nesterov = false say what plain averaging does: only other values are ignored
  given = [f"strategy.{name} = {str(value).lower()}" for name, value in
           (("outer_momentum", outer_momentum), ("outer_nesterov", outer_nesterov)) if value]
  if outer_lr is None and given:
    raise ConfigError(f"{' and '.join(given)} {'configure' if len(given) > 1 else 'configures'} the outer "
                      f"optimizer, which needs strategy.outer_lr; without it the replicas are averaged plainly and "
                      f"{'they' if len(given) > 1 else 'it'} would change nothing. Add outer_lr (DiLoCo: outer_lr = "
                      f"0.7, outer_momentum = 0.9, outer_nesterov = true) or drop "
                      f"{'them' if len(given) > 1 else 'it'} (CLI: --unset strategy.KEY).")
  if outer_nesterov and not outer_momentum:
    raise ConfigError("strategy.outer_nesterov = true needs strategy.outer_momentum > 0 (DiLoCo uses 0.9): Nesterov "
                      "momentum without momentum is plain SGD.")
  outer = None
  if outer_lr is not None:
    outer = optax.sgd(outer_lr, momentum=outer_momentum or None, nesterov=bool(outer_nesterov))
  return local_sgd(loss_fn, optimizer, mesh, axis=axis, sync_every=sync_every, outer_optimizer=outer,
                   reducer=reducer_from_config(reducer))


def sharded_from_config(loss_fn, optimizer, mesh, *, rules=(), data_axis: str = "data", fsdp_axis: str = "",
                        fsdp_min_size: int | None = None) -> Strategy:
  """``sharded`` with TOML-friendly options: ``rules`` a list of [pattern, [axis or "" per dim]] pairs
  (or "tp", resolved by ``build`` to the model's tensor-parallel rules); ``fsdp_axis = ""`` for none."""
  # the shape of the list is checked here, to convert it; its entries by partition_specs, like any rule's
  pair = lambda r: isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], (list, tuple))
  if not (isinstance(rules, (list, tuple)) and all(pair(r) for r in rules)):
    raise ConfigError(f"strategy.rules must be \"tp\" (the model's tensor-parallel rules) or a list of "
                      f"[pattern, [axis, \"\" or [axes] per dimension]] pairs, e.g. [[\"w$\", [\"\", \"model\"]]], "
                      f"got {rules!r}.")
  rules = tuple((p, tuple(tuple(a) if isinstance(a, (list, tuple)) else (a or None) for a in spec))
                for p, spec in rules)
  if fsdp_min_size is not None and not fsdp_axis:
    raise ConfigError(f"strategy.fsdp_min_size = {fsdp_min_size!r} applies with strategy.fsdp_axis (the axis FSDP "
                      f"splits parameters over), which is not set. Add fsdp_axis, e.g. fsdp_axis = \"data\", or drop "
                      f"fsdp_min_size (CLI: --unset strategy.fsdp_min_size).")
  return sharded(loss_fn, optimizer, mesh, rules=rules, data_axis=data_axis, fsdp_axis=fsdp_axis or None,
                 fsdp_min_size=DEFAULT_FSDP_MIN_SIZE if fsdp_min_size is None else fsdp_min_size)


def fsdp_from_config(loss_fn, optimizer, mesh, *, axis: str = "fsdp", min_size: int = 1024) -> Strategy:
  """The explicit shard_map FSDP (``jdist.model_parallel.fsdp``)."""
  return fsdp(loss_fn, optimizer, mesh, axis=axis, min_size=min_size)


def async_sgd_from_config(loss_fn, optimizer, mesh, *, num_workers: int = 8, pause_prob: float = 0.0,
                          max_staleness: int = -1, apply: str = "mean", staleness_lr: str = "",
                          delay_compensation: float = 0.0) -> Strategy:
  """``async_sgd`` for configs: workers over the mesh's first axis, ``max_staleness = -1`` for no bound,
  ``staleness_lr = ""`` for none. Its ``shard_batch`` takes global batches (as ``ArrayLoader`` yields) and
  splits them into one slice per worker. The schedule's seed is the config's ``strategy.seed`` (see ``build``)."""
  strategy = async_sgd(loss_fn, optimizer, mesh, num_workers=num_workers, axis=mesh.axis_names[0],
                       pause_prob=pause_prob, max_staleness=None if max_staleness < 0 else max_staleness, apply=apply,
                       staleness_lr=staleness_lr or None, delay_compensation=delay_compensation)
  return strategy._replace(shard_batch=lambda batch: strategy.shard_batch(split_workers(batch, num_workers)))


def pipeline_from_config(loss_fn, optimizer, mesh, *, microbatches: int = 4, schedule: str = "gpipe",
                         repeats: int | None = None, data_axis: str = "", remat: str = "") -> Strategy:
  """``pipeline`` of the residual MLP (model.name = "resmlp"): its residual layers are the stages. ``remat``
  names a ``jax.checkpoint_policies`` policy ("" keeps every residual)."""
  stage_fn, head_loss, input_fn = resmlp.pipeline_fns()
  return pipeline(stage_fn, head_loss, optimizer, mesh, axis="pipe", microbatches=microbatches, schedule=schedule,
                  repeats=repeats, data_axis=data_axis or None, input_fn=input_fn, remat=remat or None)


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "pipeline": pipeline_from_config,
    "async_sgd": async_sgd_from_config,
    "data_parallel": data_parallel_from_config,
    "local_sgd": local_sgd_from_config,
    "sharded": sharded_from_config,
    "fsdp": fsdp_from_config,
}


@dataclasses.dataclass
class Experiment:
  """Everything ``fit`` needs, built from a config."""

  config: Config
  strategy: Strategy
  state: Any
  loader: ArrayLoader
  eval_fn: Callable | None
  eval_data: Any
  num_params: int


def _model(config: Config, key) -> tuple[Any, Callable, Callable | None]:
  """(params, loss_fn, eval_fn) for the configured model and data."""
  if config.model.name in ("mlp", "resmlp"):
    if config.data.name != "digits":
      raise ConfigError(f"model.name = {config.model.name!r} is a classifier and needs data.name = 'digits', got "
                        f"{config.data.name!r}.")
    if config.model.name == "mlp":
      params, model = mlp.init(key, [64, *config.model.widths, 10]), mlp
    else:
      params = resmlp.init(key, 64, config.model.widths[0], len(config.model.widths), 10)
      model = resmlp
      if config.strategy.name == "pipeline":  # its state may hold the layers in device order: build() binds
        return params, model.loss, _pipeline_eval  # the schedule that undoes it

    def eval_fn(params, batch):
      loss, aux = model.loss_and_accuracy(params, batch)
      return {"loss": loss, **aux}

    return params, model.loss, eval_fn
  if config.data.name != "linear_regression":
    raise ConfigError(f"model.name = 'linear' needs data.name = 'linear_regression', got {config.data.name!r}.")
  return linear.init(in_features=1), linear.loss, lambda p, b: {"loss": linear.loss(p, b)}


def _pipeline_eval(params, batch, schedule):
  """resmlp loss and accuracy from pipeline params (the layers in the order of ``schedule``'s devices)."""
  from jdist.strategies.pipeline import unstack_params

  loss, aux = resmlp.loss_and_accuracy(unstack_params(params, schedule), batch)
  return {"loss": loss, "accuracy": aux["accuracy"]}


def _data(config: Config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
  if config.data.name == "digits":
    return datasets.digits(seed=config.data.seed)
  data = datasets.linear_regression()
  return data, data


def build_strategy(name: str, loss_fn: Callable, optimizer, mesh, options: dict[str, Any]) -> Strategy:
  """Looks up ``name`` in ``STRATEGIES`` and calls it with ``options``, checking the option names."""
  if name not in STRATEGIES:
    hint = difflib.get_close_matches(name, list(STRATEGIES), n=1)
    raise ConfigError(f"Unknown strategy {name!r}. It needs to be one of {sorted(STRATEGIES)}"
                      + (f"; did you mean {hint[0]!r}?" if hint else "."))
  factory = STRATEGIES[name]
  params = inspect.signature(factory).parameters
  valid = [p for p, v in params.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
  for key in options:
    if key not in valid:
      if key in MOVED_TO_REDUCER and "reducer" in valid:
        raise ConfigError(f"Option {key!r} of strategy {name!r} is now strategy.reducer.{MOVED_TO_REDUCER[key]}: "
                          f"write it in a [strategy.reducer] table, e.g. [strategy.reducer] name = \"powersgd\", "
                          f"rank = 4 (CLI: --set strategy.reducer.{MOVED_TO_REDUCER[key]}=...).")
      hint = difflib.get_close_matches(key, valid, n=1)
      raise ConfigError(f"Unknown option {key!r} for strategy {name!r}. Valid options: {', '.join(valid)}"
                        + (f". Did you mean {hint[0]!r}?" if hint else "."))
  return factory(loss_fn, optimizer, mesh, **options)


def build(config: Config) -> Experiment:
  """Builds the mesh, strategy, initial state and data of ``config``."""
  devices = jax.devices()
  if config.mesh.num_devices:
    if config.mesh.num_devices > len(devices):
      raise ConfigError(f"mesh.num_devices = {config.mesh.num_devices} but only {len(devices)} devices are available.")
    devices = devices[:config.mesh.num_devices]
  axes = dict(config.mesh.axes)
  total = math.prod(axes.values()) if all(isinstance(v, int) and v > 0 for v in axes.values()) else None
  # make_mesh's own advice (devices=..., emulate_devices) is for Python callers: give the config's
  if total is not None and total < len(devices):
    raise ConfigError(f"mesh {axes} uses {total} devices but {len(devices)} are available. Make the sizes multiply "
                      f"to {len(devices)} (one of them may be -1), or use the first {total}: mesh.num_devices = {total} "
                      f"(--set mesh.num_devices={total}).")
  if total is not None and total > len(devices):
    more = (f" On a CPU-only host, emulate {total}: mesh.cpu_devices = {total} (--set mesh.cpu_devices={total})."
            if devices[0].platform == "cpu" else "")
    raise ConfigError(f"mesh {axes} needs {total} devices but only {len(devices)} are available "
                      f"({devices[0].platform}). Use smaller axes.{more}")
  try:
    mesh = make_mesh(devices=devices, **axes)
  except ValueError as e:
    raise ConfigError(f"mesh {axes}: {e}") from None
  key = jax.random.key(config.train.seed)
  params, loss_fn, eval_fn = _model(config, key)
  train_data, test_data = _data(config)
  options = dict(config.strategy.options)
  if config.strategy.name == "pipeline" and config.model.name != "resmlp":
    raise ConfigError(f"strategy 'pipeline' needs a stack of identical layers: use model.name = 'resmlp', got "
                      f"{config.model.name!r}.")
  if options.get("rules") == "tp":  # the model's own tensor-parallel rules
    if config.model.name != "mlp":
      raise ConfigError(f"strategy.rules = 'tp' is defined for model.name = 'mlp', got {config.model.name!r}.")
    options["rules"] = [(p, [a or "" for a in spec]) for p, spec in mlp.tp_rules(len(config.model.widths) + 1)]
  try:  # what the strategy refuses (an option's value, rules that fit no parameter) is the config's error
    strategy = build_strategy(config.strategy.name, loss_fn, config.optimizer.build(), mesh, options)
    # a strategy's randomness comes from its init key alone: strategy.seed varies it (async SGD's schedule) and
    # leaves the parameters, drawn from train.seed, as they are
    seed = config.train.seed if config.strategy.seed is None else config.strategy.seed
    state = strategy.init(params, key=seed)
  except ConfigError:
    raise
  except IdleAxesError as e:  # the same, said in the config's terms
    it = "it" if len(e.idle) == 1 else "them"
    n = math.prod(e.kept.values())
    raise ConfigError(f"strategy {config.strategy.name!r}: {e.problem} Name {it} in the strategy's options, or drop "
                      f"{it} from [mesh] ({' '.join(f'--unset mesh.{a}' for a in e.idle)}) and use {n} device(s) "
                      f"(--set mesh.num_devices={n}).") from None
  except (ValueError, TypeError) as e:
    raise ConfigError(f"strategy {config.strategy.name!r}: {e}") from None
  if config.strategy.name == "pipeline":
    eval_fn = functools.partial(eval_fn, schedule=strategy.info["schedule"])
  loader = ArrayLoader(train_data, config.data.batch_size, seed=config.data.seed)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return Experiment(config, strategy, state, loader, eval_fn, test_data, num_params)


def run(config: Config, *, callbacks=(), quiet: bool = False):
  """Builds and trains ``config``; resumes from ``run_dir/checkpoints`` when checkpoints exist."""
  exp = build(config)
  run_dir = pathlib.Path(config.run_dir)
  c = config.checkpoint
  checkpoint = CheckpointConfig(directory=run_dir / "checkpoints", every_steps=c.every_steps,
                                every_seconds=c.every_seconds or None, keep=c.keep,
                                fallback=c.fallback) if c.enabled else None
  cbs = [NanGuard(), *callbacks]
  if not quiet:
    cbs.append(ProgressBar(exp.strategy.name) if config.train.progress else PrintLogger(config.train.log_every))
  return exp, fit(exp.strategy, exp.state, exp.loader, steps=config.train.steps, callbacks=cbs,
                  checkpoint=checkpoint, eval_fn=exp.eval_fn, eval_data=exp.eval_data,
                  eval_every=config.train.eval_every, log_every=config.train.log_every, run_dir=run_dir,
                  flops_per_step=6.0 * exp.num_params * config.data.batch_size)  # dense-model 6 N per example
