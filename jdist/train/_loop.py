"""``jdist.fit``: the training loop that runs any strategy, with checkpoints, evaluation and callbacks."""
from __future__ import annotations

import dataclasses
import itertools
import numbers
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jdist import distributed
from jdist._checks import check_positive_int
from jdist.batches import holds_global_arrays
from jdist.errors import OptionError
from jdist.mesh import replicate
from jdist.state import TrainState
from jdist.strategy import Strategy
from jdist.train._checkpoint import (
  CheckpointConfig,
  Checkpointer,
  CheckpointError,
  nonfinite_leaves,
)
from jdist.train._signals import Interrupts
from jdist.train._writers import (
  METRICS_FILE,
  TIMING_FILE,
  JsonlWriter,
  TensorBoardWriter,
)


@dataclasses.dataclass(repr=False)
class FitResult:
  """What ``fit`` returns.

  Attributes:
    state: the final ``TrainState``.
    history: one dict of host metrics per step run in this call (resumed steps are not repeated).
    eval_history: one dict per evaluation.
    start_step: the step training started (or resumed) from.
    stop_reason: why the loop ended before ``steps`` (a callback, exhausted data), else None.
    failed: True when it ended on a failure (e.g. a NaN loss); the failing step was not checkpointed.
    resumed_from: the checkpoint the run resumed from (its directory), or None.
  """

  state: TrainState
  history: list[dict[str, float]]
  eval_history: list[dict[str, float]]
  start_step: int
  stop_reason: str | None = None
  failed: bool = False
  resumed_from: str | None = None

  def __repr__(self) -> str:  # short: the state and the histories would print tens of thousands of characters
    last = self.history[-1] if self.history else {}
    loss = f", loss {last['loss']:.4g}" if "loss" in last else ""
    evals = self.eval_history[-1] if self.eval_history else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in evals.items() if k != "step")
    return (f"FitResult(steps {self.start_step} -> {int(self.state.step)}{loss}"
            + (f", last eval: {shown}" if shown else "")
            + (f", stopped: {self.stop_reason}" if self.stop_reason else "") + (", failed" if self.failed else "")
            + f"; {len(self.history)} history rows, {len(self.eval_history)} evaluations)")


class LoopControl:
  """What callbacks see of the running loop."""

  def __init__(self, strategy: Strategy, total_steps: int, run_dir: pathlib.Path | None, *, evaluates: bool = False):
    self.strategy = strategy
    self.total_steps = total_steps
    self.run_dir = run_dir
    self.stop_reason: str | None = None
    self.failed = False
    self.last_checkpoint_step: int | None = None
    self.evaluates = evaluates  # whether the run has an eval_fn (on_eval will be called)

  def request_stop(self, reason: str, *, failed: bool = False) -> None:
    """Ends the loop after the current step (with ``fit(overlap=True)``, after the step already running
    behind it); ``failed=True`` also skips checkpointing those steps."""
    if self.stop_reason is None:
      self.stop_reason = reason
    self.failed = self.failed or failed

  def fail(self, what: str) -> None:
    """Stops the run as failed (no more checkpoints), saying ``what`` went wrong and which checkpoint is kept."""
    good = self.last_checkpoint_step
    self.request_stop(what + (f", the last good checkpoint (step {good}) is kept" if good is not None else "")
                      + ". Lower the learning rate or check the data.", failed=True)


def _call(callbacks, hook, *args):
  for cb in callbacks:
    fn = getattr(cb, hook, None)
    if fn is not None:
      fn(*args)


def _host(metrics: dict[str, Any], copy_ahead: bool = True) -> dict[str, float]:
  """The scalar metrics as Python numbers. ``copy_ahead``: read them with ``jax.device_get``, which starts
  every device-to-host copy before waiting for the first (and is an explicit transfer under
  ``jax.transfer_guard``); on CPU devices there is nothing to copy, and ``np.asarray`` alone costs a tenth
  of it per scalar (about 1 us against 10)."""
  out = {}
  values = jax.device_get(metrics) if copy_ahead else {k: metrics[k] for k in sorted(metrics)}  # keys sorted alike
  for k, v in values.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = v.item()
  return out


def _mesh_peak(strategy: Strategy, peak_flops: float | None) -> float | None:
  """Peak FLOP/s of all the devices of the strategy's mesh (None if one device's peak is unknown)."""
  from jdist.analysis.perf import peak_flops as device_peak

  per_device = peak_flops if peak_flops is not None else device_peak(strategy.mesh.devices.flat[0])
  return per_device * strategy.mesh.size if per_device is not None else None


def fit(
    strategy: Strategy,
    state: TrainState,
    data: Iterable[Any],
    *,
    steps: int,
    callbacks: Sequence[Any] = (),
    checkpoint: CheckpointConfig | None = None,
    eval_fn: Callable[[Any, Any], dict[str, Any]] | None = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    log_every: int = 10,
    run_dir: str | os.PathLike | None = None,
    tensorboard: bool = True,
    overlap: bool = True,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
) -> FitResult:
  """Trains ``state`` with ``strategy`` until ``state.step == steps``, resuming from a checkpoint if any.

  Args:
    strategy: any jdist strategy (``init`` / ``shard_batch`` / ``step``).
    state: the initial state from ``strategy.init``; also the template (shapes and shardings) that a
      checkpoint is restored into, so resuming on a different mesh works (except for state kept per
      device or worker: compression residuals and local SGD's replicas need as many data-axis devices,
      async SGD's worker copies as many workers; a mismatch is a ``CheckpointError`` that says so).
    data: an iterable of host batches. If it has ``get_state`` / ``set_state`` (``jdist.data.ArrayLoader``)
      its position is checkpointed and restored; otherwise a resumed run skips the batches already used.
    steps: the total number of steps (not the number still to run).
    callbacks: objects with any of ``on_start``, ``on_step``, ``on_eval``, ``on_checkpoint``, ``on_end``;
      one with ``get_state`` / ``set_state`` (JSON-able data, e.g. ``EarlyStopping``'s counters) has its
      state saved in every checkpoint and restored on resume, matched by position and class name.
    checkpoint: a ``CheckpointConfig``; ``fit`` resumes from the newest checkpoint in its directory. A
      state with an inf or nan in a floating leaf of ``params``, ``opt_state`` or ``extra`` is never saved:
      the run stops as failed instead (so a strategy's ``extra`` must not hold an inf on purpose).
    eval_fn: ``eval_fn(params, batch) -> dict of scalars``, jitted; run on ``eval_data`` (one batch)
      every ``eval_every`` steps and at the end; logged with an ``eval_`` prefix.
    log_every: write ``metrics.jsonl`` / TensorBoard every this many steps (and at the last step).
    run_dir: where metric logs go (none written if None). In a multi-process run only process 0 writes
      them; every process saves its part of the checkpoints (one directory, shared by all).
    tensorboard: also write TensorBoard event files under ``run_dir/tensorboard``.
    overlap: dispatch step k + 1 before reading step k's metrics, so the devices never wait for the
      host (callbacks, logs, the next batch), as in a hand-written loop that reads its metrics late.
      Evaluation and checkpoint steps are read before going on, so they see exactly their step's
      state, and a failed step is never checkpointed. A stop that a callback requests at step k
      (``EarlyStopping`` on a training metric, ``NanGuard``) then ends the run after step k + 1, which
      was already running; pass ``overlap=False`` to stop at exactly step k (one host wait per step).
    flops_per_step: the model FLOPs of one step (e.g. ``gpt.flops_per_token(cfg) * tokens_per_step``);
      ``timing.jsonl`` then also gets ``model_tflops_per_s`` and, where the peak is known, ``mfu``:
      model FLOPs per second over the peak of all the mesh's devices.
    peak_flops: the peak FLOP/s of one device (default: ``jdist.analysis.perf.peak_flops`` of the mesh's devices).

  Resuming prints ``resumed from step N (checkpoint PATH)`` (process 0). SIGINT and SIGTERM make the loop
  finish the step it is running, checkpoint it (with ``checkpoint``), print where the run resumes and raise
  (``jdist.train._signals`` has the contract; several processes agree on the step through JAX's preemption sync
  point).

  Returns:
    A ``FitResult``.

  Raises:
    CheckpointError: the newest checkpoint cannot be read (unless ``checkpoint.fallback``).
    ValueError: bad arguments.
    jdist.train.Interrupted (a ``KeyboardInterrupt``) / jdist.train.Terminated (a ``SystemExit``, code 143): SIGINT
      / SIGTERM, after the current step was finished and saved.
  """
  flops_per_step, peak_flops = _check_args(steps, log_every, eval_every, flops_per_step, peak_flops, eval_fn,
                                           eval_data)
  run_path = pathlib.Path(run_dir) if run_dir is not None else None
  # how the state orders stacked layers, if not as the model does (a circular pipeline): recorded in every
  # checkpoint, and a checkpoint in another order is refused, never scrambled
  layout = strategy.info.get("layer_layout")
  checkpointer = Checkpointer(checkpoint, layer_layout=layout) if checkpoint is not None else None
  keyed_callbacks = [(f"{i}.{type(cb).__name__}", cb) for i, cb in enumerate(callbacks)]
  with Interrupts() as interrupts:
    return _fit(strategy, state, data, steps, callbacks, keyed_callbacks, checkpoint, checkpointer, run_path,
                interrupts, eval_fn=eval_fn, eval_data=eval_data, eval_every=eval_every, log_every=log_every,
                tensorboard=tensorboard, overlap=overlap, flops_per_step=flops_per_step, peak_flops=peak_flops)


def _fit(strategy, state, data, steps, callbacks, keyed_callbacks, checkpoint, checkpointer, run_path, interrupts, *,
         eval_fn, eval_data, eval_every, log_every, tensorboard, overlap, flops_per_step, peak_flops) -> FitResult:
  """``fit`` after its arguments were checked, with the interrupt handlers installed."""
  state, batches, resumed_from = _resume(checkpointer, state, data, keyed_callbacks)
  start = int(state.step)
  if resumed_from is not None and jax.process_index() == 0:
    print(f"resumed from step {start} (checkpoint {resumed_from})"
          + (f"; steps={steps} are done, nothing to run" if start >= steps else ""), flush=True)
  control = LoopControl(strategy, steps, run_path, evaluates=eval_fn is not None)
  control.last_checkpoint_step = checkpointer.last_saved_step if checkpointer else None
  if start > steps:
    control.request_stop(f"the state is already at step {start}, past steps={steps}; nothing was run")
  # several processes: only process 0 writes the logs
  peak = _mesh_peak(strategy, peak_flops) if flops_per_step is not None else None
  logs = (_Logs(run_path, start, tensorboard=tensorboard, flops_per_step=flops_per_step, peak=peak)
          if run_path is not None and jax.process_index() == 0 else None)
  run = _Run(strategy=strategy, state=state, steps=steps, start=start, control=control, callbacks=callbacks,
             keyed_callbacks=keyed_callbacks, data=data, checkpointer=checkpointer, logs=logs,
             evaluator=_evaluator(eval_fn, eval_data, state, strategy.mesh), eval_every=eval_every,
             log_every=log_every, overlap=overlap, interrupts=interrupts, resumed_from=resumed_from)
  result = None
  try:
    _call(callbacks, "on_start", control, start)  # inside: a callback failing here still ends the others
    run.loop(batches)
    run.wrap_up(save_at_end=checkpoint is not None and (checkpoint.save_at_end or run.interrupted))
    result = run.result()
  finally:
    if logs is not None:
      logs.close()
    if checkpointer is not None:
      checkpointer.close()
    if result is None:  # an exception (Ctrl-C, the data, a step): callbacks still end (a progress bar stops)
      error = sys.exc_info()[1]
      control.request_stop(f"{type(error).__name__} at step {run.step}" if error else f"stopped at step {run.step}",
                           failed=True)
      result = run.result()
    _call(callbacks, "on_end", control, result)
  if run.interrupted:
    raise run.interruption()
  return result

def _check_args(steps, log_every, eval_every, flops_per_step, peak_flops, eval_fn, eval_data):
  """``fit``'s arguments checked; returns ``(flops_per_step, peak_flops)`` as floats (or None)."""
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise OptionError("steps", steps, "a non-negative int (the total number of steps)")
  check_positive_int(log_every, "log_every")
  if eval_every is not None:
    check_positive_int(eval_every, "eval_every")
  for name, value, what in (("flops_per_step", flops_per_step, "model FLOPs of one step"),
                            ("peak_flops", peak_flops, "FLOP/s of one device")):
    if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0):
      raise OptionError(name, value, f"a positive number ({what})")
  if (eval_fn is None) != (eval_data is None):
    raise ValueError("Pass eval_fn and eval_data together (eval_fn(params, batch) -> dict of metrics).")
  return (float(flops_per_step) if flops_per_step is not None else None,
          float(peak_flops) if peak_flops is not None else None)


def _resume(checkpointer, state, data, keyed_callbacks):
  """The state to start from (the newest checkpoint's, else ``state``), the batches that follow it and the
  checkpoint's path (None: not resumed); restores the data position and the callbacks' state saved with it."""
  given_step = int(state.step)
  restored = checkpointer.restore_latest(state) if checkpointer is not None else None
  if restored is None:
    return state, iter(data), None  # the state passed in continues with the data as given
  step, state, meta = restored
  path = str(checkpointer.step_path(step))
  checkpointer.last_saved_step = int(state.step)
  for key, cb in keyed_callbacks:
    if hasattr(cb, "set_state") and key in meta.get("callbacks", {}):
      cb.set_state(meta["callbacks"][key])
  start = int(state.step)
  if "data" in meta:
    if not hasattr(data, "set_state"):
      raise CheckpointError("The checkpoint holds a data position but the data has no set_state(); resume "
                            "with the same kind of data (e.g. jdist.data.ArrayLoader).")
    data.set_state(meta["data"])
    return state, iter(data), path
  # no data position saved (the run that wrote it read a plain iterable): the data replays from where the
  # state passed in was, so skip the batches the checkpoint covers
  if start < given_step:
    raise CheckpointError(
        f"The state passed in is at step {given_step} but the newest checkpoint is at step {start}, and it holds "
        f"no data position to move the data back to: resuming would skip {given_step - start} batch(es). "
        f"Pass the state from strategy.init, use data with get_state/set_state (jdist.data.ArrayLoader) in the "
        f"run that writes the checkpoints, or a checkpoint directory of this run.")
  return state, itertools.islice(iter(data), start - given_step, None), path


def _evaluator(eval_fn, eval_data, state, mesh):
  """``eval_fn`` jitted on ``eval_data`` (replicated: it is small and of any size), as ``params -> metrics``,
  after checking it returns a dict of scalars (now, not after the steps before the first evaluation)."""
  if eval_fn is None:
    return None
  eval_step = jax.jit(eval_fn)
  eval_batch = replicate(eval_data, mesh)
  shape = jax.eval_shape(eval_fn, state.params, eval_batch)
  if not isinstance(shape, dict):
    raise ValueError(f"eval_fn(params, batch) must return a dict of scalar metrics, e.g. {{'loss': loss}}; it "
                     f"returned {type(shape).__name__} {jax.tree.map(lambda x: x.shape, shape)}. A loss with "
                     f"has_aux=True returns (loss, aux): wrap it, e.g. lambda p, b: {{'loss': loss_fn(p, b)[0]}}.")
  not_scalar = {k: getattr(v, "shape", type(v).__name__) for k, v in shape.items() if getattr(v, "shape", None) != ()}
  if not_scalar:  # they would be dropped from the logs and never seen by EarlyStopping
    raise ValueError(f"eval_fn(params, batch) must return a dict of scalars; these are not: {not_scalar}. "
                     f"Reduce them, e.g. jnp.mean(...).")
  return lambda params: eval_step(params, eval_batch)


class _Logs:
  """A run's ``metrics.jsonl``, ``timing.jsonl`` and TensorBoard events, and the timing window between logs."""

  def __init__(self, run_path: pathlib.Path, start: int, *, tensorboard: bool, flops_per_step: float | None,
               peak: float | None):
    self.metrics_log = JsonlWriter(run_path / METRICS_FILE, resume_step=start)
    self.timing_log = JsonlWriter(run_path / TIMING_FILE, resume_step=start)
    self.tb = TensorBoardWriter(run_path / "tensorboard", resume_step=start) if tensorboard else None
    self.flops_per_step, self.peak = flops_per_step, peak
    self.window_start, self.window_steps, self.examples = time.perf_counter(), 0, 0

  def count(self, n_examples: int) -> None:
    self.window_steps += 1
    self.examples += n_examples

  def metrics(self, step: int, host: dict[str, float]) -> None:
    self.metrics_log.write(host)
    if self.tb is not None:
      self.tb.write(step, host)

  def timing(self, step: int) -> None:
    """Steps and examples per second since the last call (and model TFLOP/s, MFU where known)."""
    elapsed = time.perf_counter() - self.window_start
    timing = {"step": step, "steps_per_s": self.window_steps / elapsed, "examples_per_s": self.examples / elapsed}
    if self.flops_per_step is not None:
      timing["model_tflops_per_s"] = self.flops_per_step * timing["steps_per_s"] / 1e12
      if self.peak is not None:
        timing["mfu"] = self.flops_per_step * timing["steps_per_s"] / self.peak
    self.timing_log.write({**timing, "time": time.time()})
    self.window_start, self.window_steps, self.examples = time.perf_counter(), 0, 0

  def close(self) -> None:
    for w in (self.metrics_log, self.timing_log, self.tb):
      if w is not None:
        w.close()


@dataclasses.dataclass
class _Run:
  """One call of ``fit``: the loop's moving parts (the state, the step dispatched and not yet read, the
  histories) and what it does at each step (read metrics, log, evaluate, checkpoint)."""

  strategy: Strategy
  state: TrainState
  steps: int
  start: int
  control: LoopControl
  callbacks: Sequence[Any]
  keyed_callbacks: list[tuple[str, Any]]
  data: Any
  checkpointer: Checkpointer | None
  logs: _Logs | None
  evaluator: Callable[[Any], dict[str, Any]] | None
  eval_every: int | None
  log_every: int
  overlap: bool
  interrupts: Interrupts
  resumed_from: str | None = None

  def __post_init__(self):
    self.step = self.start
    self.history: list[dict[str, float]] = []
    self.eval_history: list[dict[str, float]] = []
    self.pending = None  # (step, metrics on the device, examples) of the last step dispatched and not yet read
    self.logged_step = None  # the last step written to the logs
    self.copy_ahead = self.strategy.mesh.devices.flat[0].platform != "cpu"
    self.run_id = distributed.next_run("fit") if jax.process_count() > 1 else None
    self.last_local = None  # examples in this process's last batch (several processes: checked when it changes)
    self.interrupted = False  # a SIGINT / SIGTERM stopped the loop (after finishing its step)

  def loop(self, batches) -> None:
    while True:
      if self.pending is not None:
        self.settle()
        if self.control.failed:
          return
      if self.step >= self.steps or self.control.stop_reason is not None:
        if self.pending is None:
          return
        continue  # read the step still running first
      try:
        batch = next(batches)
        n_examples = self.global_examples(batch)
        self.state, metrics = self.strategy.step(self.state, self.strategy.shard_batch(batch))
      except StopIteration:
        self.control.request_stop(f"the data ran out after step {self.step}")
        continue
      except BaseException:
        if self.pending is not None:  # the step before the failing one still gets its record
          self.finish(*self.pending)
        raise
      self.step += 1
      if self.interrupts.stop_after(self.step):  # every process asks after every step (a collective answer)
        self.interrupted = True
        self.control.request_stop(f"interrupted by {self.interrupts.name} after step {self.step}")
      if self.pending is not None:  # overlap: read the previous step while this one runs on the devices
        self.finish(*self.pending)
      self.pending = (self.step, metrics, n_examples)

  def settle(self) -> None:
    """Reads the pending step now if anything needs its exact state (evaluation, a checkpoint, the end)."""
    k, metrics, n_examples = self.pending
    eval_due = self.evaluator is not None and ((self.eval_every and k % self.eval_every == 0) or k == self.steps)
    save_due = self.checkpointer is not None and self.checkpointer.due(k)
    # evaluation and checkpoints need step k's state, which the next (donating) step consumes
    if not (not self.overlap or eval_due or save_due or k >= self.steps or self.control.stop_reason is not None):
      return
    self.pending = None
    self.finish(k, metrics, n_examples)
    if self.control.failed:
      return
    try:  # evaluation first, so the checkpoint holds what it did (its log line, EarlyStopping's count)
      if eval_due:
        self.evaluate(k)
    finally:  # and a failing or interrupted evaluation does not cost the checkpoint
      if save_due:
        self.save(k)

  def global_examples(self, batch) -> int:
    """Examples in the global batch; several processes each pass their share (jdist.batches.put_batch)."""
    n_local = len(jax.tree.leaves(batch)[0])
    if self.run_id is not None and n_local != self.last_local and not holds_global_arrays(batch):
      # unequal shares would silently skew the average: compare them at the first batch and at each change
      distributed.check_batch_sizes(n_local, f"fit {self.run_id}, step {self.step + 1}", timeout_s=(
          distributed.FIRST_BATCH_TIMEOUT_S if self.last_local is None else distributed.DEFAULT_TIMEOUT_S))
      self.last_local = n_local
    return n_local * jax.process_count()

  def finish(self, k: int, metrics: dict[str, Any], n_examples: int) -> None:
    """Step k's metrics to the host: history, callbacks, logs (a failed step is not logged)."""
    if self.logs is not None:
      self.logs.count(n_examples)
    host = _host(metrics, self.copy_ahead)
    host["step"] = k
    self.history.append(host)
    _call(self.callbacks, "on_step", self.control, k, host)
    if not self.control.failed and (k % self.log_every == 0 or k == self.steps):
      self.log(k, host)

  def log(self, k: int, host: dict[str, float]) -> None:
    self.logged_step = k
    if self.logs is not None:
      self.logs.metrics(k, host)
      self.logs.timing(k)

  def evaluate(self, step: int) -> None:
    metrics = {f"eval_{k}": v for k, v in _host(self.evaluator(self.state.params)).items()}
    metrics["step"] = step
    self.eval_history.append(metrics)
    if self.logs is not None:
      self.logs.metrics(step, metrics)
    _call(self.callbacks, "on_eval", self.control, step, metrics)

  def save(self, step: int) -> None:
    # extra too: local SGD's replicas, async SGD's worker copies and compression residuals train between syncs
    state = self.state
    bad = nonfinite_leaves({"params": state.params, "opt_state": state.opt_state, "extra": state.extra})
    if bad:  # a finite loss does not make the update after it finite: never keep such a checkpoint
      self.control.fail(f"the state after step {step} is not finite (inf or nan in {', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}); training stopped and step {step} was not checkpointed")
      return
    position = {"data": self.data.get_state()} if hasattr(self.data, "get_state") else {}
    states = {key: cb.get_state() for key, cb in self.keyed_callbacks if hasattr(cb, "get_state")}
    if states:  # callbacks that count (EarlyStopping) resume where they were
      position["callbacks"] = states
    path = self.checkpointer.save(step, state, position)
    self.control.last_checkpoint_step = step
    _call(self.callbacks, "on_checkpoint", self.control, step, path)

  def wrap_up(self, *, save_at_end: bool) -> None:
    """A run that ended early (data, a callback) logs and evaluates its last step too; then the final save. An
    interrupted one only saves: its logs stay those of the uninterrupted run, which the resumed run continues."""
    if not self.control.failed and self.step > self.start and not self.interrupted:
      if self.logged_step != self.step:
        self.log(self.step, self.history[-1])
      if self.evaluator is not None and (not self.eval_history or self.eval_history[-1]["step"] != self.step):
        self.evaluate(self.step)
    if save_at_end and not self.control.failed and self.checkpointer.last_saved_step != self.step:
      self.save(self.step)

  def result(self) -> FitResult:
    return FitResult(state=self.state, history=self.history, eval_history=self.eval_history, start_step=self.start,
                     stop_reason=self.control.stop_reason, failed=self.control.failed, resumed_from=self.resumed_from)

  def interruption(self) -> BaseException:
    """What an interrupted run raises, after saying (process 0) what was kept and where it resumes."""
    saved = self.checkpointer is not None and self.checkpointer.last_saved_step == self.step
    path = str(self.checkpointer.step_path(self.step)) if saved else None
    if saved:
      message = (f"{self.interrupts.name}: finished step {self.step} and saved it ({path}); run again to resume "
                 f"from step {self.step}.")
    elif self.checkpointer is not None and self.checkpointer.last_saved_step is not None:
      message = (f"{self.interrupts.name}: stopped after step {self.step}, which was not saved ("
                 f"{self.control.stop_reason}); a new run resumes from step {self.checkpointer.last_saved_step}.")
    else:
      message = (f"{self.interrupts.name}: stopped after step {self.step}; no checkpoint was written (fit has no "
                 f"checkpoint=), so a new run starts from the beginning.")
    if jax.process_index() == 0:
      print(f"jdist.fit: {message}", file=sys.stderr, flush=True)
    return self.interrupts.error(message, self.step, path)
