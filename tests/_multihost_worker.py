"""One process of the multi-process tests (run by ``jdist launch`` or directly with ``JDIST_*`` set).

``python tests/_multihost_worker.py train OUT_DIR``: every strategy of ``CASES`` (data_parallel, FSDP by
GSPMD and by shard_map, pipeline on three meshes and in its three schedules, local SGD, DiLoCo, async SGD) for
``STEPS`` steps, through ``fit`` with a checkpoint after ``CKPT_STEP`` in ``OUT_DIR/cases/NAME``, the misuses
of ``errors``, then ``fit`` with checkpoints into ``OUT_DIR/ckpt``; process 0 writes the final params, the
losses and the error messages to ``OUT_DIR/result.npz``.
``python tests/_multihost_worker.py resume SOURCE OUT_DIR``: the ``FOUR_PROCESS_CASES`` resumed from those
checkpoints; process 0 writes ``OUT_DIR/resumed.npz``.
``python tests/_multihost_worker.py elastic OUT_DIR [PAUSE_S [PAUSE_SAVE_AT]]``: the elastic FSDP run (one
attempt of it under ``jdist launch --max-restarts``); exits at once if ``OUT_DIR/lost-slot-S`` exists for its
launcher slot S (a lost host).
``python tests/_multihost_worker.py spin``: trains until killed, printing its pid and one line per step.
The same setup functions build the single-process reference in the tests.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, NamedTuple

if __name__ == "__main__":  # join the other processes before anything touches JAX
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # a lost host, for the elastic tests: this launcher slot's process can no longer start
  if (sys.argv[1] == "elastic"
      and os.path.exists(os.path.join(sys.argv[2], f"lost-slot-{os.environ.get('JDIST_SLOT')}"))):
    sys.exit(f"slot {os.environ.get('JDIST_SLOT')}: this host is gone")
  import jdist.distributed

  jdist.distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
import jdist.distributed  # noqa: E402
from jdist.data import ArrayLoader  # noqa: E402
from jdist.models import mlp, resmlp  # noqa: E402
from jdist.strategies.async_sgd import split_workers  # noqa: E402

STEPS = 20  # steps of the equivalence runs
CKPT_STEP = 12  # the 2-process runs save a checkpoint after this step only; resumes on 1 and 4 processes go on to STEPS
FIT_STEPS = 12  # steps fit runs on 2 processes before the 1-process resume
TOTAL_FIT_STEPS = 20
BATCH = 64  # global batch
SIZES = [16, 64, 64, 4]


def dataset() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, SIZES[0])).astype(np.float32)
  y = (np.abs(x[:, :4]).argmax(-1)).astype(np.int32)
  return {"x": x, "y": y}


def loader() -> ArrayLoader:
  """The same global batches in every process count; each process yields its share."""
  return ArrayLoader(dataset(), BATCH, seed=1)


def params():
  return mlp.init(jax.random.key(0), SIZES)


def data_parallel_strategy():
  return jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1))


def fsdp_strategy():
  return jdist.sharded(mlp.loss, optax.adam(1e-2), jdist.make_mesh(fsdp=-1), data_axis=None, fsdp_axis="fsdp",
                       fsdp_min_size=256)


def pipeline_params():
  return resmlp.init(jax.random.key(0), SIZES[0], 32, 8, SIZES[-1])


def pipeline_strategy(data_axis: str | None = None, schedule: str = "gpipe", **axes: int):
  stage, head_loss, embed = resmlp.pipeline_fns()
  return jdist.pipeline(stage, head_loss, optax.adam(1e-2), jdist.make_mesh(**axes), microbatches=4,
                        data_axis=data_axis, input_fn=embed, schedule=schedule)


def async_strategy():
  return jdist.async_sgd(mlp.loss, optax.adam(1e-2), jdist.make_mesh(workers=-1), num_workers=8)


class Case(NamedTuple):
  """A strategy to run for ``STEPS`` steps: its initial params, what it takes of a loader batch, and whether
  the steps go through ``jdist.scan_steps`` (all in one jitted scan) instead of ``step``."""

  make: Callable[[], jdist.Strategy]
  params: Callable[[], object] = params
  prepare: Callable[[dict], dict] = lambda batch: batch
  scan: bool = False


# On 2 processes x 4 devices: data2_pipe4 splits the batch over a data axis that runs across the processes
# (each process places only its share); pipe8 replicates it over the processes (the shares are gathered).
# async_sgd: each process passes its own 4 of the 8 workers' slices.
CASES = {
    "data_parallel": Case(data_parallel_strategy),
    "fsdp": Case(fsdp_strategy),
    "fsdp_shard_map": Case(lambda: jdist.model_parallel.fsdp(mlp.loss, optax.adam(1e-2), jdist.make_mesh(fsdp=-1),
                                                             min_size=256)),
    "pipeline_data2_pipe4": Case(lambda: pipeline_strategy("data", data=2, pipe=4), pipeline_params),
    "pipeline_pipe8": Case(lambda: pipeline_strategy(pipe=8), pipeline_params),
    "pipeline_1f1b_pipe8": Case(lambda: pipeline_strategy(schedule="1f1b", pipe=8), pipeline_params),
    "pipeline_circular_data2_pipe4": Case(lambda: pipeline_strategy("data", "circular", data=2, pipe=4),
                                          pipeline_params),
    # the pipe axis across the processes, the data axis inside each (its rows come from both shares: gathered)
    "pipeline_pipe4_data2": Case(lambda: pipeline_strategy("data", pipe=4, data=2), pipeline_params),
    "local_sgd": Case(lambda: jdist.local_sgd(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1), sync_every=2)),
    "diloco": Case(lambda: jdist.local_sgd(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1), sync_every=2,
                                           outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True))),
    "async_sgd": Case(async_strategy, prepare=lambda batch: split_workers(batch, 8)),
    "async_sgd_run": Case(async_strategy, prepare=lambda batch: split_workers(batch, 8), scan=True),
}


class Prepared:
  """The loader's batches through a case's ``prepare``, with the loader's position (which ``fit`` checkpoints)."""

  def __init__(self, case: Case):
    self.loader, self.prepare = loader(), case.prepare

  def __iter__(self):
    return map(self.prepare, iter(self.loader))

  def get_state(self):
    return self.loader.get_state()

  def set_state(self, state):
    self.loader.set_state(state)


def run(case: Case, steps: int, checkpoint_dir: str | None = None, strategy: jdist.Strategy | None = None):
  """``steps`` steps on the loader's batches; returns (params on the host, losses). With ``checkpoint_dir`` the
  steps run through ``jdist.fit``, which saves a checkpoint there after step ``CKPT_STEP`` (and no other).
  ``strategy``: one the case made before (its step is compiled already)."""
  strategy = strategy or case.make()
  state = strategy.init(case.params())
  if checkpoint_dir is not None:
    ckpt = jdist.CheckpointConfig(directory=checkpoint_dir, every_steps=CKPT_STEP, save_at_end=False)
    result = jdist.fit(strategy, state, Prepared(case), steps=steps, checkpoint=ckpt, log_every=steps)
    return gather(result.state.params), np.array([h["loss"] for h in result.history])
  batches = iter(loader())
  if case.scan:
    # each process places its own share of every step's batch; the global batches are then stacked on the mesh
    placed = [strategy.shard_batch(case.prepare(next(batches))) for _ in range(steps)]
    stacked = jax.jit(lambda *bs: jax.tree.map(lambda *x: jax.numpy.stack(x), *bs))(*placed)
    state, metrics = jdist.scan_steps(strategy, state, stacked)
    return gather(state.params), np.asarray(gather(metrics["loss"]))
  losses = []
  for _ in range(steps):
    state, metrics = strategy.step(state, strategy.shard_batch(case.prepare(next(batches))))
    losses.append(float(metrics["loss"]))
  return gather(state.params), np.array(losses)


def resume(case: Case, checkpoint_dir: str, steps: int, strategy: jdist.Strategy | None = None):
  """``fit`` from the newest checkpoint in ``checkpoint_dir`` (written by any number of processes) to ``steps``;
  returns (params on the host, the losses of the steps it ran)."""
  strategy = strategy or case.make()
  ckpt = jdist.CheckpointConfig(directory=checkpoint_dir, save_at_end=False)
  result = jdist.fit(strategy, strategy.init(case.params()), Prepared(case), steps=steps, checkpoint=ckpt,
                     log_every=steps)
  assert result.start_step == CKPT_STEP, result.start_step
  return gather(result.state.params), np.array([h["loss"] for h in result.history])


def _uneven_shares():
  """``fit`` for one step where process 0 passes 32 examples and process 1 passes 16."""
  strategy = data_parallel_strategy()
  rows = 32 if jax.process_index() == 0 else 16
  batch = {k: v[:rows] for k, v in dataset().items()}
  return jdist.fit(strategy, strategy.init(params()), [batch], steps=1)


def errors() -> dict[str, str]:
  """What each of these raises in this run ("" if nothing): data_parallel's pmap backend for one step,
  async_sgd without a mesh, async_sgd's shard_batch given all 8 workers' slices instead of its own,
  ``fit`` given unequal shares, and the batch-size check reached by process 0 alone (its batch changed)."""
  tries = {
      "uneven_shares": _uneven_shares,
      "alone": lambda: jdist.distributed.check_batch_sizes(8, "a check only process 0 makes", timeout_s=2.0)
      if jax.process_index() == 0 else None,
      "pmap": lambda: run(Case(lambda: jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1),
                                                           backend="pmap")), 1),
      "async_without_mesh": lambda: jdist.async_sgd(mlp.loss, optax.sgd(0.1), None, num_workers=8),
      "async_all_workers": lambda: async_strategy().shard_batch(split_workers(next(iter(loader())), 8,
                                                                              process_count=1)),
  }
  out = {}
  for name, attempt in tries.items():
    try:
      attempt()
      out[name] = ""
    except Exception as e:  # noqa: BLE001 - reported to the test
      out[name] = f"{type(e).__name__}: {e}"
  return out


def gather(tree):
  """Every leaf as a full numpy array on every process (collective: all processes call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
  return {f"{prefix}/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


class _RacingClock:
  """A clock that moves an hour each time it is read: this process alone finds a time-based checkpoint
  due at every step."""

  reads = 0

  @classmethod
  def monotonic(cls):
    cls.reads += 1
    return time.monotonic() + 3600.0 * cls.reads


def fit_run(directory: str, steps: int):
  strategy = fsdp_strategy()
  if jax.process_index() == 1:  # the processes must still agree on when to save: process 0's clock decides
    import jdist.train._checkpoint as checkpoint_module

    checkpoint_module.time = _RacingClock
  # by step at 3, 6, 9, 12; the time check falls on step 10 (jdist.train._checkpoint.TIME_CHECK_EVERY), where
  # process 1's clock says "save" and process 0's does not: both must follow process 0
  ckpt = jdist.CheckpointConfig(directory=os.path.join(directory, "ckpt"), every_steps=3, every_seconds=1800.0)
  result = jdist.fit(strategy, strategy.init(params()), loader(), steps=steps, checkpoint=ckpt, log_every=1,
                     run_dir=os.path.join(directory, "run"), tensorboard=False)
  return result


def main_train(out: str) -> None:
  results = {}
  for name, case in CASES.items():
    p, losses = run(case, STEPS, None if case.scan else os.path.join(out, "cases", name))
    results.update(flat(name, p))
    results[f"{name}/losses"] = losses
  results.update({f"error/{name}": np.array(message) for name, message in errors().items()})
  fitted = fit_run(out, FIT_STEPS)
  results.update(flat("fit", gather(fitted.state.params)))
  if jdist.distributed.is_coordinator():
    np.savez(os.path.join(out, "result.npz"), **results)
  print(f"process {jax.process_index()} of {jax.process_count()} done, {len(jax.devices())} devices", flush=True)


ELASTIC_STEPS = 16  # the elastic run: FSDP through fit, a checkpoint every ELASTIC_EVERY steps
ELASTIC_EVERY = 2


class _SayStep:
  """Prints every step ("step 3 loss 1.2"), in every process, then sleeps ``pause`` s: room for a kill."""

  def __init__(self, pause: float):
    self.pause = pause

  def on_step(self, loop, step, metrics):
    print(f"step {step} loss {metrics['loss']:.6f}", flush=True)
    time.sleep(self.pause)


def _pause_before_commit(step: int, seconds: float) -> None:
  """Makes the save of ``step`` wait ``seconds`` once its files are written, before orbax commits it (renames
  ``STEP.orbax-checkpoint-tmp`` to ``STEP``, on process 0), saying so: a kill then lands inside the save."""
  import asyncio

  from orbax.checkpoint._src.path import atomicity

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self._final_path.name == str(step) and self._final_path.parent.name == "ckpt":
      print(f"committing checkpoint step {step}", flush=True)
      await asyncio.sleep(seconds)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def elastic_run(out: str, *, pause: float = 0.0, pause_save_at: int | None = None):
  """FSDP on every device for ``ELASTIC_STEPS`` steps through ``fit``, resuming from ``out/ckpt``."""
  if pause_save_at is not None and jdist.distributed.restart_count() == 0:
    _pause_before_commit(pause_save_at, 30.0)
  strategy = fsdp_strategy()
  ckpt = jdist.CheckpointConfig(directory=os.path.join(out, "ckpt"), every_steps=ELASTIC_EVERY, keep=2)
  return jdist.fit(strategy, strategy.init(params()), loader(), steps=ELASTIC_STEPS, checkpoint=ckpt,
                   callbacks=[_SayStep(pause)], log_every=ELASTIC_STEPS)


def main_elastic(out: str, pause: float, pause_save_at: int | None) -> None:
  """One attempt of the elastic run; process 0 writes ``out/attempt-R.npz`` (R: the launcher's restart count)."""
  result = elastic_run(out, pause=pause, pause_save_at=pause_save_at)
  final = gather(result.state.params)
  if jdist.distributed.is_coordinator():
    np.savez(os.path.join(out, f"attempt-{jdist.distributed.restart_count()}.npz"), start_step=result.start_step,
             devices=len(jax.devices()), processes=jax.process_count(),
             losses=np.array([h["loss"] for h in result.history]), **flat("params", final))
  print(f"process {jax.process_index()} of {jax.process_count()} finished from step {result.start_step}", flush=True)


# resumed on 4 processes: one case per strategy and per way its state lies across processes (the others share
# a layout with one of these: fsdp_shard_map's with fsdp, 1F1B's with GPipe's pipe8, local SGD's with DiLoCo's)
FOUR_PROCESS_CASES = ("data_parallel", "fsdp", "pipeline_pipe8", "pipeline_circular_data2_pipe4",
                      "pipeline_pipe4_data2", "diloco", "async_sgd")


def main_resume(source: str, out: str) -> None:
  """The cases of ``FOUR_PROCESS_CASES`` resumed from ``source/NAME`` (checkpoints of ``main_train``) to ``STEPS``."""
  results = {}
  for name, case in CASES.items():
    if name in FOUR_PROCESS_CASES:
      p, losses = resume(case, os.path.join(source, name), STEPS)
      results.update(flat(name, p))
      results[f"{name}/losses"] = losses
  if jdist.distributed.is_coordinator():
    np.savez(os.path.join(out, "resumed.npz"), **results)
  print(f"process {jax.process_index()} of {jax.process_count()} resumed, {len(jax.devices())} devices", flush=True)


def main_spin() -> None:
  print(f"pid {os.getpid()} process {jax.process_index()}", flush=True)
  strategy = data_parallel_strategy()
  state = strategy.init(params())
  for step, batch in enumerate(loader()):
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    print(f"step {step} loss {float(metrics['loss']):.4f}", flush=True)
    time.sleep(0.05)


if __name__ == "__main__":
  if sys.argv[1] == "train":
    main_train(sys.argv[2])
  elif sys.argv[1] == "resume":
    main_resume(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "elastic":  # elastic OUT [PAUSE_S [PAUSE_SAVE_AT]]
    main_elastic(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0,
                 int(sys.argv[4]) if len(sys.argv) > 4 else None)
  else:
    main_spin()
