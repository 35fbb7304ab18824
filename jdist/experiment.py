"""From a ``Config`` to a finished run: builds the model, data, optimizer, mesh and strategy, then fits.

The CLI only parses arguments into a ``Config`` and calls ``run``. New strategies plug in by adding an
entry to ``STRATEGIES``: ``name -> builder(loss_fn, optimizer, mesh, **options) -> Strategy`` (the pipeline's
builder gets the model's ``Pipelined`` in place of the loss).

How a config's callables are called (names checked when the config is read, ``jdist.config.check_calls``):

- ``[model]``: ``fn(key=jax.random.key(train.seed), **kwargs)`` (``key`` only if ``fn`` takes it) returns a
  ``jdist.models.Model``, a pair ``(params, loss)``, or the params alone (then ``[loss]`` names the loss).
- ``[loss]``: ``fn(params, batch, **kwargs)``, or ``fn(params, batch, key, **kwargs)`` when ``fn`` is marked
  ``jdist.takes_key``; it replaces the model's own loss.
- ``[data]``: ``fn(seed=data.seed, **kwargs)`` (``seed`` only if ``fn`` takes it) returns the training arrays
  (a dict of arrays with one leading example axis), or a pair ``(train, test)``; ``test`` (or None) is the one
  batch ``Model.eval`` runs on.
- ``[optimizer]``: ``optax.<name>(**kwargs)`` (or the import path's callable), nested ``{name = ...}`` tables
  called first.
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

from jdist import _config_calls as calls
from jdist import datasets, reducers
from jdist.config import Config, ConfigError, check_calls
from jdist.data import ArrayLoader
from jdist.errors import IdleAxesError, OptionError, OptionTypeError
from jdist.mesh import make_mesh
from jdist.models import Model, Pipelined
from jdist.models._bundled import MODELS
from jdist.strategies.async_sgd import async_sgd, split_workers
from jdist.strategies.data_parallel import data_parallel
from jdist.strategies.local_sgd import local_sgd
from jdist.strategies.model_parallel import DEFAULT_FSDP_MIN_SIZE, fsdp, sharded
from jdist.strategies.pipeline import pipeline
from jdist.strategy import KeyedLoss, Strategy, takes_key
from jdist.train import CheckpointConfig, NanGuard, PrintLogger, ProgressBar, fit

DATASETS = datasets.BUNDLED  # the data sets a config names by name (``[data] name = "text"``)
__all__ = ["DATASETS", "MODELS", "STRATEGIES", "Experiment", "Model", "Pipelined", "build", "run"]


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


def pipeline_from_config(model: Pipelined, optimizer, mesh, *, microbatches: int = 4, schedule: str = "gpipe",
                         repeats: int | None = None, data_axis: str = "", remat: str = "") -> Strategy:
  """``pipeline`` of the model's stages (``Model.pipeline``: the residual MLP's layers, the GPT's blocks); it is
  given the model's ``Pipelined`` in place of a loss. ``remat`` names a ``jax.checkpoint_policies`` policy
  ("" keeps every residual)."""
  return pipeline(model.stage_fn, model.loss_fn, optimizer, mesh, axis="pipe", microbatches=microbatches,
                  schedule=schedule, repeats=repeats, data_axis=data_axis or None, input_fn=model.input_fn,
                  remat=remat or None)


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
  flops_per_step: float | None = None


def _model(config: Config) -> Model:
  """The ``Model`` the config's ``[model]`` callable returns (its ``loss`` replaced by ``[loss]``'s, if given)."""
  fn = calls.resolve("model.name", config.model.name, MODELS, what="a bundled model")
  given = {"key": jax.random.key(config.train.seed)} if calls.Signature(fn).takes("key") else {}
  out = _calling(f"model.name = {config.model.name!r}", fn, {**config.model.kwargs, **given})
  if isinstance(out, Model):
    model = out
  elif isinstance(out, tuple) and len(out) == 2 and callable(out[1]):
    model = Model(params=out[0], loss=out[1])
  else:
    model = Model(params=out)
  if config.loss.name is not None:
    model = dataclasses.replace(model, loss=_loss(config))
  if model.loss is None:
    raise ConfigError(f"model.name = {config.model.name!r} returned no loss: return a jdist.models.Model with loss=, "
                      f"or a pair (params, loss), or name one in [loss] (name = \"package.module:loss\").")
  return model


def _loss(config: Config) -> Callable:
  """``[loss]``'s function with its keyword arguments bound (still a ``takes_key`` loss if it was one)."""
  fn = calls.resolve("loss.name", config.loss.name, {}, what="an import path")
  kwargs = dict(config.loss.kwargs)
  if isinstance(fn, KeyedLoss):
    return takes_key(functools.partial(fn.fn, **kwargs)) if kwargs else fn
  return functools.partial(fn, **kwargs) if kwargs else fn


def _data(config: Config) -> tuple[Any, Any]:
  """``(train, test or None)`` from the config's ``[data]`` callable."""
  fn = calls.resolve("data.name", config.data.name, datasets.BUNDLED, what="a bundled data set")
  given = {"seed": config.data.seed} if calls.Signature(fn).takes("seed") else {}
  out = _calling(f"data.name = {config.data.name!r}", fn, {**config.data.kwargs, **given})
  train, test = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
  if not isinstance(train, Mapping):
    raise ConfigError(f"data.name = {config.data.name!r} returned a {type(train).__name__}; return the training "
                      f"arrays as a dict of arrays (name -> [examples, ...]), or a pair (train, test).")
  return train, test


def _calling(what: str, fn: Callable, kwargs: Mapping[str, Any]) -> Any:
  """``fn(**kwargs)``; a ``ValueError`` / ``TypeError`` it raises is the config's error, said in one line."""
  try:
    return calls.call(fn, kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{what}: {type(e).__name__}: {e}") from None


def _optimizer(config: Config) -> Any:
  try:
    return config.optimizer.build()
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:  # optax's constructors check some arguments themselves
    raise ConfigError(f"optimizer.name = {config.optimizer.name!r}: {type(e).__name__}: {e}") from None


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


def _mesh(config: Config):
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
                      f"to {len(devices)} (one of them may be -1), or use the first {total}: "
                      f"mesh.num_devices = {total} (--set mesh.num_devices={total}).")
  if total is not None and total > len(devices):
    more = (f" On a CPU-only host, emulate {total}: mesh.cpu_devices = {total} (--set mesh.cpu_devices={total})."
            if devices[0].platform == "cpu" else "")
    raise ConfigError(f"mesh {axes} needs {total} devices but only {len(devices)} are available "
                      f"({devices[0].platform}). Use smaller axes.{more}")
  try:
    return make_mesh(devices=devices, **axes)
  except ValueError as e:
    raise ConfigError(f"mesh {axes}: {e}") from None


def _strategy_inputs(config: Config, model: Model) -> tuple[Any, Any, dict[str, Any]]:
  """What the strategy is built from: the loss (the pipeline: the model's stages), the initial params, options."""
  options = dict(config.strategy.options)
  if options.get("rules") == "tp":  # the model's own tensor-parallel rules, in the config's form
    if not model.rules:
      raise ConfigError(f"strategy.rules = 'tp' uses the model's tensor-parallel rules, and model.name = "
                        f"{config.model.name!r} declares none (Model.rules). Give the rules as a list of [pattern, "
                        f"[axis or \"\" per dimension]] pairs.")
    as_toml = lambda entry: entry if isinstance(entry, str) else list(entry) if entry else ""
    options["rules"] = [(p, [as_toml(a) for a in spec]) for p, spec in model.rules]
  if config.strategy.name != "pipeline":
    return model.loss, model.params, options
  if model.pipeline is None:
    raise ConfigError(f"strategy 'pipeline' needs a model made of identical stacked layers (Model.pipeline): "
                      f"model.name = 'resmlp' or 'gpt', got {config.model.name!r}.")
  to_pipeline = model.pipeline.to_pipeline or (lambda p: p)
  return model.pipeline, to_pipeline(model.params), options


def _eval_fn(config: Config, model: Model, strategy: Strategy) -> Callable | None:
  """``Model.eval`` (on the pipeline's params: back in the model's layout), else the loss if it takes no key."""
  eval_fn = model.eval
  if eval_fn is None:
    if isinstance(model.loss, KeyedLoss):
      return None  # dropout in evaluation: the model must say how to switch it off (Model.eval)
    eval_fn = lambda params, batch: {"loss": model.loss(params, batch)}
  if config.strategy.name != "pipeline":
    return eval_fn
  from jdist.strategies.pipeline import unstack_params

  schedule, back = strategy.info["schedule"], model.pipeline.from_pipeline or (lambda p: p)
  return lambda params, batch: eval_fn(back(unstack_params(params, schedule)), batch)


def _check_runs(strategy: Strategy, state: Any, loader: ArrayLoader, config: Config) -> None:
  """Traces one step on the first batch (nothing runs): a model that does not fit the data is the config's error
  now, not a trace from the first step."""
  batch = strategy.shard_batch(next(iter(ArrayLoader(loader.arrays, loader.batch_size, seed=loader.seed))))
  try:
    jax.eval_shape(strategy.step.jitted if hasattr(strategy.step, "jitted") else strategy.step, state, batch)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model.name = {config.model.name!r} cannot train on data.name = {config.data.name!r} "
                      f"({type(e).__name__}: {' '.join(str(e).split())[:600]})") from None


def build(config: Config) -> Experiment:
  """Builds the mesh, model, data, optimizer, strategy and initial state of ``config``."""
  config = check_calls(config)  # a Config made in Python is checked as a file is
  mesh = _mesh(config)
  model = _model(config)
  train_data, test_data = _data(config)
  loss_fn, params, options = _strategy_inputs(config, model)
  optimizer = _optimizer(config)
  try:  # what the strategy refuses (an option's value, rules that fit no parameter) is the config's error
    strategy = build_strategy(config.strategy.name, loss_fn, optimizer, mesh, options)
    # a strategy's randomness comes from its init key alone: strategy.seed varies it (async SGD's schedule, a
    # takes_key loss's dropout) and leaves the parameters, drawn from train.seed, as they are
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
  try:
    loader = ArrayLoader(train_data, config.data.batch_size, seed=config.data.seed)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"data.name = {config.data.name!r}: {e}") from None
  _check_runs(strategy, state, loader, config)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
  per_example = model.flops_per_example or 6.0 * num_params  # dense-model 6 N per example
  return Experiment(config, strategy, state, loader, _eval_fn(config, model, strategy) if test_data is not None
                    else None, test_data, num_params, per_example * config.data.batch_size)


def run(config: Config, *, callbacks=(), quiet: bool = False, allow_config_change: bool = False):
  """Builds and trains ``config``; resumes from ``run_dir/checkpoints`` when checkpoints exist.

  The resolved config is saved as ``run_dir/config.toml``; a resume whose config computes something else (any key
  but ``jdist.config.RESUMABLE``) is refused, naming the keys, unless ``allow_config_change``, which records the
  change in ``run_dir/events.jsonl``.
  """
  exp = build(config)
  run_dir = pathlib.Path(config.run_dir)
  c = config.checkpoint
  checkpoint = CheckpointConfig(directory=run_dir / "checkpoints", every_steps=c.every_steps,
                                every_seconds=c.every_seconds or None, keep=c.keep,
                                fallback=c.fallback) if c.enabled else None
  guard_run_dir(exp.config, run_dir, allow_change=allow_config_change)
  cbs = [NanGuard(), *callbacks]
  if not quiet:
    cbs.append(ProgressBar(exp.strategy.name) if config.train.progress else PrintLogger(config.train.log_every))
  return exp, fit(exp.strategy, exp.state, exp.loader, steps=config.train.steps, callbacks=cbs,
                  checkpoint=checkpoint, eval_fn=exp.eval_fn, eval_data=exp.eval_data,
                  eval_every=config.train.eval_every, log_every=config.train.log_every, run_dir=run_dir,
                  flops_per_step=exp.flops_per_step)


CONFIG_FILE = "config.toml"  # the resolved config of the run, in its run_dir
EVENTS_FILE = "events.jsonl"  # one line per end of a run (ended, failed, interrupted) and accepted config change


def guard_run_dir(config: Config, run_dir: pathlib.Path, *, allow_change: bool) -> None:
  """Saves the resolved config in ``run_dir``; a run dir with checkpoints whose saved config differs in what it
  computes is refused (``ConfigError`` naming the keys) unless ``allow_change`` (then recorded in the events).
  In a multi-process run only process 0 writes."""
  from jdist import config as config_lib

  new = config_lib.to_dict(config)
  saved_path = run_dir / CONFIG_FILE
  resuming = any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")) if config.checkpoint.enabled else False
  changes = {}
  if resuming and saved_path.is_file():
    changes = config_lib.run_changes(config_lib.read_toml(saved_path), new)
  if changes and not allow_change:
    shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in ((k, *v) for k, v in changes.items()))
    raise ConfigError(f"{run_dir} holds checkpoints of a run with another config ({shown}). Resuming would mix the "
                      f"two. Use another run_dir (--set run_dir=...), or pass --allow-config-change to continue with "
                      f"the new config (recorded in {run_dir / EVENTS_FILE}).")
  if jax.process_index() != 0:
    return
  run_dir.mkdir(parents=True, exist_ok=True)
  partial = saved_path.with_suffix(".toml.partial")  # renamed into place: other processes never read half a file
  partial.write_text(config_lib.dumps(new))
  partial.replace(saved_path)
  if changes:
    record_event(run_dir, "config_change", changes={k: list(v) for k, v in changes.items()})


def record_event(run_dir: pathlib.Path, event: str, **fields: Any) -> None:
  """Appends ``{"time", "event", **fields}`` to ``run_dir/events.jsonl``."""
  import json
  import time

  with open(run_dir / EVENTS_FILE, "a") as f:
    f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")


def _short(value: Any) -> str:
  text = "(unset)" if value is None else repr(value)
  return text if len(text) <= 60 else text[:57] + "..."
