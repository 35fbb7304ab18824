"""Compile a layout's real jdist step from shapes only, on emulated CPU devices, and read what one device does.

Nothing is allocated or run: the parameters and the batch are ``jax.ShapeDtypeStruct``s (``jax.eval_shape``), the
strategy's step is lowered and compiled, and the compiled program gives the memory (``memory_analysis``), the
collectives (``comm_report``) and the matmul FLOPs (counted from its HLO, loops by their trip counts). A job
needing more devices than this process has runs in a subprocess started with that many
(``python -m jdist.analysis.plan._worker``); results are cached on disk, keyed by everything that determines
the program.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any, Sequence

# XLA's LLVM back end is what takes the time on a CPU, and it decides nothing a report reads (the HLO, the
# buffer assignment and the memory figures are settled before it): measured identical memory and collectives
# at half the compile time
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CACHE_VERSION = 2  # bump when what a job compiles changes


@dataclasses.dataclass(frozen=True)
class CompileJob:
  """One program to compile: jdist's GPT of ``model`` (GPTConfig keywords; ``n_layers`` the compiled depth)
  under ``strategy`` on a mesh of ``axes``, for a global batch of ``batch`` sequences."""

  model: tuple  # sorted (key, value) pairs of GPTConfig keywords; compute_dtype as a dtype name
  strategy: str  # "data_parallel", "sharded" or "pipeline"
  axes: tuple  # (("data", 2), ("fsdp", 4), ...): the compile mesh, outermost first
  batch: int
  microbatches: int = 1
  optimizer: str = "adam"

  @property
  def devices(self) -> int:
    return math.prod(n for _, n in self.axes)

  def key(self) -> str:
    import jax

    from jdist import __version__

    text = json.dumps([CACHE_VERSION, jax.__version__, __version__, COMPILER_OPTIONS, dataclasses.asdict(self)],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _gpt_config(job: CompileJob):
  import jax.numpy as jnp

  from jdist.models import gpt

  kw = dict(job.model)
  kw["compute_dtype"] = jnp.dtype(kw.get("compute_dtype", "float32"))
  return gpt.GPTConfig(**kw)


def _optimizer(name: str):
  import optax

  return {"adam": lambda: optax.adam(1e-3), "adamw": lambda: optax.adamw(1e-3), "sgd": lambda: optax.sgd(1e-3),
          "momentum": lambda: optax.sgd(1e-3, momentum=0.9)}[name]()


def build(job: CompileJob, devices: Sequence[Any] | None = None):
  """The strategy, abstract state and abstract batch of ``job`` on the first ``job.devices`` devices."""
  import jax
  import jax.numpy as jnp

  import jdist
  from jdist.models import gpt

  cfg = _gpt_config(job)
  devices = list(devices if devices is not None else jax.devices())[:job.devices]
  mesh = jdist.make_mesh(devices=devices, **dict(job.axes)) if job.axes else jdist.make_mesh(devices=devices, data=1)
  axes = dict(job.axes)
  opt = _optimizer(job.optimizer)
  params = jax.eval_shape(lambda k: gpt.init(k, cfg), jax.random.key(0))
  if job.strategy == "data_parallel":
    strategy = jdist.data_parallel(gpt.loss_fn(cfg), opt, mesh, accumulate_steps=job.microbatches)
  elif job.strategy == "sharded":
    strategy = jdist.sharded(gpt.loss_fn(cfg), opt, mesh, rules=gpt.TP_RULES if axes.get("model", 1) > 1 else (),
                             fsdp_axis="fsdp" if axes.get("fsdp", 1) > 1 else None)
  elif job.strategy == "pipeline":
    stage_fn, loss, input_fn, to_pipeline = gpt.pipeline_fns(cfg)
    strategy = jdist.pipeline(stage_fn, loss, opt, mesh, microbatches=job.microbatches, schedule="1f1b",
                              data_axis="data" if "data" in axes else None, input_fn=input_fn)
    params = jax.eval_shape(to_pipeline, params)
  else:
    raise ValueError(f"no jdist strategy runs {job.strategy!r}")
  state = _placed(jax.eval_shape(lambda p: strategy.init(p, key=0), params), params, job.strategy, strategy, opt)
  batch = {"tokens": jax.ShapeDtypeStruct((job.batch, cfg.seq_len + 1), jnp.int32)}
  return strategy, state, batch


def _placed(state, params, kind: str, strategy, optimizer):
  """``state``'s shapes with the shardings ``strategy.init`` would give them (``eval_shape`` gives none, and a
  step lowered on unplaced inputs lets XLA pick their layout: a different program). data_parallel's step fixes
  its inputs' layout itself (``shard_map``); the others' parameters are placed by their rules."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jdist.strategy import optimizer_shardings

  mesh = strategy.mesh
  if kind == "sharded":
    from jdist.strategies.model_parallel import partition_specs

    info = strategy.info
    specs, _ = partition_specs(params, info["rules"], mesh, fsdp_axis=info["fsdp_axis"],
                               fsdp_min_size=info["fsdp_min_size"])
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  elif kind == "pipeline":
    from jdist.strategies.pipeline._layout import param_shardings

    shardings = param_shardings(params, "pipe", mesh)
  else:
    return state
  opt = optimizer_shardings(optimizer, state.opt_state, params, shardings, mesh)
  put = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  replicated = NamedSharding(mesh, P())
  return state.replace(step=put(state.step, replicated), key=put(state.key, replicated),
                       params=jax.tree.map(put, state.params, shardings),
                       opt_state=jax.tree.map(put, state.opt_state, opt))


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\]")
_DOT = re.compile(r"\bdot\(%([\w.\-]+),.*?lhs_contracting_dims=\{([0-9,]*)\}")


def dot_flops(text: str) -> float:
  """Matmul FLOPs of a compiled program's HLO text, per call: 2 x output elements x contracted size of every
  ``dot``, times how often its computation runs (loop bodies by their trip counts)."""
  from jdist.analysis._comm import _COMPUTATION, _multipliers

  multipliers, _ = _multipliers(text)
  total, current, shapes = 0.0, None, {}
  for line in text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      current, shapes = c.group(2), {}
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    dims = [int(d) for d in m.group(3).split(",") if d]
    shapes[m.group(1)] = dims
    d = _DOT.search(line)
    if d and d.group(1) in shapes:
      lhs = shapes[d.group(1)]
      contracted = math.prod(lhs[int(i)] for i in d.group(2).split(",") if i)
      total += 2.0 * math.prod(dims) * contracted * multipliers.get(current, 1)
  return total


def _shard_bytes(shapes_and_shardings) -> float:
  import numpy as np

  total = 0.0
  for x, s in shapes_and_shardings:
    shape = s.shard_shape(x.shape) if s is not None and hasattr(s, "shard_shape") else x.shape
    total += float(np.prod(shape, dtype=np.float64)) * x.dtype.itemsize
  return total


def compile_job(job: CompileJob, devices: Sequence[Any] | None = None) -> dict:
  """Compiles ``job`` in this process and returns its per-device figures (a JSON-able dict)."""
  import jax

  from jdist.analysis._comm import comm_report

  start = time.perf_counter()
  strategy, state, batch = build(job, devices)
  compiled = strategy.step.lower(state, batch).compile(COMPILER_OPTIONS)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  pairs = jax.tree.map(lambda x, s: (x, s), state, compiled.input_shardings[0][0])
  is_pair = lambda t: isinstance(t, tuple) and len(t) == 2 and hasattr(t[0], "shape")
  param_leaves = jax.tree.leaves(pairs.params, is_leaf=is_pair)
  opt_leaves = jax.tree.leaves(pairs.opt_state, is_leaf=is_pair)
  report = comm_report(compiled)
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {"memory": {f: int(getattr(mem, f)) for f in fields}, "param_bytes": _shard_bytes(param_leaves),
          "optimizer_bytes": _shard_bytes(opt_leaves), "flops": dot_flops(compiled.as_text()),
          "collectives": {k: [s.count, s.payload_bytes, s.sent_bytes] for k, s in report.stats.items()},
          "compile_seconds": seconds}


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  """Where compiled results are kept: ``path``, else $JDIST_PLAN_CACHE, else ~/.cache/jdist/plan."""
  base = path or os.environ.get("JDIST_PLAN_CACHE") or pathlib.Path.home() / ".cache" / "jdist" / "plan"
  return pathlib.Path(base)


def run_jobs(jobs: Sequence[CompileJob], *, cache: str | os.PathLike | None | bool = None,
             timeout_s: float = 3600.0) -> list[dict]:
  """Results of ``jobs`` (cached ones read back; ``cache=False`` neither reads nor writes). Jobs that need more
  devices than this process has are compiled together in one subprocess that emulates enough of them."""
  import jax

  folder = None if cache is False else cache_dir(cache if isinstance(cache, (str, os.PathLike)) else None)
  results: dict[int, dict] = {}
  todo = []
  for i, job in enumerate(jobs):
    hit = folder / f"{job.key()}.json" if folder else None
    if hit is not None and hit.is_file():
      results[i] = {**json.loads(hit.read_text()), "cached": True}
    else:
      todo.append(i)
  here = len(jax.devices())
  local = [i for i in todo if jobs[i].devices <= here]
  remote = [i for i in todo if jobs[i].devices > here]
  for i in local:
    results[i] = compile_job(jobs[i])
  if remote:
    for i, r in zip(remote, _subprocess([jobs[i] for i in remote], timeout_s)):
      results[i] = r
  for i in todo:
    if folder is not None:
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"{jobs[i].key()}.json").write_text(json.dumps(results[i]))
    results[i] = {**results[i], "cached": False}
  return [results[i] for i in range(len(jobs))]


def _subprocess(jobs: Sequence[CompileJob], timeout_s: float) -> list[dict]:
  n = max(job.devices for job in jobs)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  root = str(pathlib.Path(__file__).resolve().parents[3])  # the jdist that runs this one, installed or not
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  payload = json.dumps([dataclasses.asdict(j) for j in jobs])
  proc = subprocess.run([sys.executable, "-m", "jdist.analysis.plan._worker"], input=payload, capture_output=True,
                        text=True, env=env, timeout=timeout_s)
  if proc.returncode:
    raise RuntimeError(f"compiling {len(jobs)} layout(s) on {n} emulated devices failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def job_from_dict(raw: dict) -> CompileJob:
  return CompileJob(model=tuple(tuple(p) for p in raw["model"]), strategy=raw["strategy"],
                    axes=tuple(tuple(a) for a in raw["axes"]), batch=raw["batch"], microbatches=raw["microbatches"],
                    optimizer=raw["optimizer"])
