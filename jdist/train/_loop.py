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
from jdist.batches import holds_global_arrays
from jdist.mesh import replicate
from jdist.state import TrainState
from jdist.strategy import Strategy
from jdist.train._checkpoint import (
  CheckpointConfig,
  Checkpointer,
  CheckpointError,
  nonfinite_leaves,
)
from jdist.train._writers import (
  METRICS_FILE,
  TIMING_FILE,
  JsonlWriter,
  TensorBoardWriter,
)


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns.

  Attributes:
    state: the final ``TrainState``.
    history: one dict of host metrics per step run in this call (resumed steps are not repeated).
    eval_history: one dict per evaluation.
    start_step: the step training started (or resumed) from.
    stop_reason: why the loop ended before ``steps`` (a callback, exhausted data), else None.
    failed: True when it ended on a failure (e.g. a NaN loss); the failing step was not checkpointed.
  """

  state: TrainState
  history: list[dict[str, float]]
  eval_history: list[dict[str, float]]
  start_step: int
  stop_reason: str | None = None
  failed: bool = False


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

  Returns:
    A ``FitResult``.

  Raises:
    CheckpointError: the newest checkpoint cannot be read (unless ``checkpoint.fallback``).
    ValueError: bad arguments.
  """
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"steps must be a non-negative int (the total number of steps), got {steps!r}.")
  if not isinstance(log_every, int) or log_every < 1:
    raise ValueError(f"log_every must be a positive int, got {log_every!r}.")
  if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
    raise ValueError(f"eval_every must be a positive int or None, got {eval_every!r}.")
  positive = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0
  if flops_per_step is not None and not positive(flops_per_step):
    raise ValueError(f"flops_per_step must be a positive number (model FLOPs of one step), got {flops_per_step!r}.")
  if peak_flops is not None and not positive(peak_flops):
    raise ValueError(f"peak_flops must be a positive number (FLOP/s of one device), got {peak_flops!r}.")
  flops_per_step = float(flops_per_step) if flops_per_step is not None else None
  peak_flops = float(peak_flops) if peak_flops is not None else None
  if (eval_fn is None) != (eval_data is None):
    raise ValueError("Pass eval_fn and eval_data together (eval_fn(params, batch) -> dict of metrics).")
  run_path = pathlib.Path(run_dir) if run_dir is not None else None
  # how the state orders stacked layers, if not as the model does (a circular pipeline): recorded in every
  # checkpoint, and a checkpoint in another order is refused, never scrambled
  layout = strategy.info.get("layer_layout")
  checkpointer = Checkpointer(checkpoint, layer_layout=layout) if checkpoint is not None else None
  meta: dict[str, Any] = {}
  given_step = int(state.step)
  restored = checkpointer.restore_latest(state) if checkpointer is not None else None
  keyed_callbacks = [(f"{i}.{type(cb).__name__}", cb) for i, cb in enumerate(callbacks)]
  if restored is not None:
    ckpt_step, state, meta = restored
    checkpointer.last_saved_step = int(state.step)
    for key, cb in keyed_callbacks:
      if hasattr(cb, "set_state") and key in meta.get("callbacks", {}):
        cb.set_state(meta["callbacks"][key])
  start = int(state.step)
  if restored is not None and "data" in meta:
    if not hasattr(data, "set_state"):
      raise CheckpointError("The checkpoint holds a data position but the data has no set_state(); resume "
                            "with the same kind of data (e.g. jdist.data.ArrayLoader).")
    data.set_state(meta["data"])
    batches = iter(data)
  elif restored is not None:
    # no data position saved (the run that wrote it read a plain iterable): the data replays from where the
    # state passed in was, so skip the batches the checkpoint covers
    if start < given_step:
      raise CheckpointError(
          f"The state passed in is at step {given_step} but the newest checkpoint is at step {start}, and it holds "
          f"no data position to move the data back to: resuming would skip {given_step - start} batch(es). "
          f"Pass the state from strategy.init, use data with get_state/set_state (jdist.data.ArrayLoader) in the "
          f"run that writes the checkpoints, or a checkpoint directory of this run.")
    batches = itertools.islice(iter(data), start - given_step, None)
  else:
    batches = iter(data)  # the state passed in continues with the data as given

  control = LoopControl(strategy, steps, run_path, evaluates=eval_fn is not None)
  control.last_checkpoint_step = checkpointer.last_saved_step if checkpointer else None
  if start > steps:
    control.request_stop(f"the state is already at step {start}, past steps={steps}; nothing was run")
  writers = []
  log_here = run_path is not None and jax.process_index() == 0  # several processes: one writes the logs
  if log_here:
    metrics_log = JsonlWriter(run_path / METRICS_FILE, resume_step=start)
    timing_log = JsonlWriter(run_path / TIMING_FILE, resume_step=start)
    tb = TensorBoardWriter(run_path / "tensorboard", resume_step=start) if tensorboard else None
    writers = [w for w in (metrics_log, timing_log, tb) if w is not None]
  eval_step = jax.jit(eval_fn) if eval_fn is not None else None
  # eval data is small and of any size: replicate it rather than split it over the data axis
  eval_batch = replicate(eval_data, strategy.mesh) if eval_data is not None else None
  if eval_step is not None:  # found now, not after the steps before the first evaluation
    shape = jax.eval_shape(eval_fn, state.params, eval_batch)
    if not isinstance(shape, dict):
      raise ValueError(f"eval_fn(params, batch) must return a dict of scalar metrics, e.g. {{'loss': loss}}; it "
                       f"returned {type(shape).__name__} {jax.tree.map(lambda x: x.shape, shape)}. A loss with "
                       f"has_aux=True returns (loss, aux): wrap it, e.g. lambda p, b: {{'loss': loss_fn(p, b)[0]}}.")
    not_scalar = {k: getattr(v, "shape", type(v).__name__) for k, v in shape.items() if getattr(v, "shape", None) != ()}
    if not_scalar:  # they would be dropped from the logs and never seen by EarlyStopping
      raise ValueError(f"eval_fn(params, batch) must return a dict of scalars; these are not: {not_scalar}. "
                       f"Reduce them, e.g. jnp.mean(...).")

  history: list[dict[str, float]] = []
  eval_history: list[dict[str, float]] = []

  def save(step, state):
    # extra too: local SGD's replicas, async SGD's worker copies and compression residuals train between syncs
    bad = nonfinite_leaves({"params": state.params, "opt_state": state.opt_state, "extra": state.extra})
    if bad:  # a finite loss does not make the update after it finite: never keep such a checkpoint
      control.fail(f"the state after step {step} is not finite (inf or nan in {', '.join(bad[:3])}"
                   f"{', ...' if len(bad) > 3 else ''}); training stopped and step {step} was not checkpointed")
      return
    position = {"data": data.get_state()} if hasattr(data, "get_state") else {}
    states = {key: cb.get_state() for key, cb in keyed_callbacks if hasattr(cb, "get_state")}
    if states:  # callbacks that count (EarlyStopping) resume where they were
      position["callbacks"] = states
    path = checkpointer.save(step, state, position)
    control.last_checkpoint_step = step
    _call(callbacks, "on_checkpoint", control, step, path)

  def evaluate(step, state):
    metrics = {f"eval_{k}": v for k, v in _host(eval_step(state.params, eval_batch)).items()}
    metrics["step"] = step
    eval_history.append(metrics)
    if log_here:
      metrics_log.write(metrics)
      if tb is not None:
        tb.write(step, metrics)
    _call(callbacks, "on_eval", control, step, metrics)

  step = start
  window_start, window_steps, examples = time.perf_counter(), 0, 0
  peak = _mesh_peak(strategy, peak_flops) if flops_per_step is not None else None
  result = None
  logged_step = None  # the last step written to the logs

  def finish(k, metrics, n_examples):
    # step k's metrics to the host: history, callbacks, logs (a failed step is not logged)
    nonlocal window_start, window_steps, examples
    window_steps += 1
    examples += n_examples
    host = _host(metrics, copy_ahead)
    host["step"] = k
    history.append(host)
    _call(callbacks, "on_step", control, k, host)
    if control.failed:
      return
    if k % log_every == 0 or k == steps:
      log(k, host)

  def log(k, host):
    nonlocal window_start, window_steps, examples, logged_step
    logged_step = k
    if log_here:
      elapsed = time.perf_counter() - window_start
      metrics_log.write(host)
      if tb is not None:
        tb.write(k, host)
      timing = {"step": k, "steps_per_s": window_steps / elapsed, "examples_per_s": examples / elapsed}
      if flops_per_step is not None:
        timing["model_tflops_per_s"] = flops_per_step * timing["steps_per_s"] / 1e12
        if peak is not None:
          timing["mfu"] = flops_per_step * timing["steps_per_s"] / peak
      timing_log.write({**timing, "time": time.time()})
      window_start, window_steps, examples = time.perf_counter(), 0, 0

  pending = None  # (step, metrics on the device, examples) of the last step dispatched and not yet read
  copy_ahead = strategy.mesh.devices.flat[0].platform != "cpu"
  run_id = distributed.next_run("fit") if jax.process_count() > 1 else None
  last_local = None  # examples in this process's last batch (several processes: checked when it changes)
  try:
    _call(callbacks, "on_start", control, start)  # inside: a callback failing here still ends the others
    while True:
      if pending is not None:
        k, metrics, n_examples = pending
        eval_due = eval_step is not None and ((eval_every and k % eval_every == 0) or k == steps)
        save_due = checkpointer is not None and checkpointer.due(k)
        # evaluation and checkpoints need step k's state, which the next (donating) step consumes
        if not overlap or eval_due or save_due or k >= steps or control.stop_reason is not None:
          pending = None
          finish(k, metrics, n_examples)
          if control.failed:
            break
          try:  # evaluation first, so the checkpoint holds what it did (its log line, EarlyStopping's count)
            if eval_due:
              evaluate(k, state)
          finally:  # and a failing or interrupted evaluation does not cost the checkpoint
            if save_due:
              save(k, state)
      if step >= steps or control.stop_reason is not None:
        if pending is None:
          break
        continue  # read the step still running first
      try:
        batch = next(batches)
        # several processes: each passes its share (jdist.batches.put_batch); count the global batch
        n_local = len(jax.tree.leaves(batch)[0])
        n_examples = n_local * jax.process_count()
        if run_id is not None and n_local != last_local and not holds_global_arrays(batch):
          # unequal shares would silently skew the average: compare them at the first batch and at each change
          distributed.check_batch_sizes(n_local, f"fit {run_id}, step {step + 1}", timeout_s=(
              distributed.FIRST_BATCH_TIMEOUT_S if last_local is None else distributed.DEFAULT_TIMEOUT_S))
          last_local = n_local
        state, metrics = strategy.step(state, strategy.shard_batch(batch))
      except StopIteration:
        control.request_stop(f"the data ran out after step {step}")
        continue
      except BaseException:
        if pending is not None:  # the step before the failing one still gets its record
          finish(*pending)
        raise
      step += 1
      if pending is not None:  # overlap: read the previous step while this one runs on the devices
        finish(*pending)
      pending = (step, metrics, n_examples)
    if not control.failed and step > start:  # ended early (data, a callback): its last step is logged too
      if logged_step != step:
        log(step, history[-1])
      if eval_step is not None and (not eval_history or eval_history[-1]["step"] != step):
        evaluate(step, state)
    if (checkpointer is not None and not control.failed and checkpoint.save_at_end
        and checkpointer.last_saved_step != step):
      save(step, state)
    result = FitResult(state=state, history=history, eval_history=eval_history, start_step=start,
                       stop_reason=control.stop_reason, failed=control.failed)
  finally:
    for w in writers:
      w.close()
    if checkpointer is not None:
      checkpointer.close()
    if result is None:  # an exception (Ctrl-C, the data, a step): callbacks still end (a progress bar stops)
      error = sys.exc_info()[1]
      control.request_stop(f"{type(error).__name__} at step {step}" if error else f"stopped at step {step}",
                           failed=True)
      result = FitResult(state=state, history=history, eval_history=eval_history, start_step=start,
                         stop_reason=control.stop_reason, failed=True)
    _call(callbacks, "on_end", control, result)
  return result
