"""Callbacks: hooks that run outside ``jit`` at fixed points of ``jdist.fit``.

A callback is any object with some of the methods below; the ones it lacks are skipped. Each receives
the ``LoopControl`` of the run, through which it may ask the loop to stop.

- ``on_start(loop, step)``: before the first step (``step`` is where the run starts or resumes).
- ``on_step(loop, step, metrics)``: after every step; ``metrics`` are host floats.
- ``on_eval(loop, step, metrics)``: after each evaluation.
- ``on_checkpoint(loop, step, path)``: after a checkpoint was written.
- ``on_end(loop, result)``: once, when the loop ends for any reason.
- ``get_state()`` / ``set_state(state)``: state that must survive a resume (JSON-able); saved in every
  checkpoint and given back when ``fit`` resumes from it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence


class Callback:
  """Base class with every hook as a no-op (subclassing it is optional)."""

  def on_start(self, loop, step: int) -> None:
    pass

  def on_step(self, loop, step: int, metrics: dict[str, float]) -> None:
    pass

  def on_eval(self, loop, step: int, metrics: dict[str, float]) -> None:
    pass

  def on_checkpoint(self, loop, step: int, path) -> None:
    pass

  def on_end(self, loop, result) -> None:
    pass


def _metric_names(keys: Any, who: str) -> tuple[str, ...]:
  """``keys`` as a tuple of metric names; one name given as a string is one name, not its letters."""
  if isinstance(keys, str):
    return (keys,)
  keys = tuple(keys)
  if not all(isinstance(k, str) for k in keys):
    raise TypeError(f"{who} keys must be metric names (strings), got {keys!r}.")
  return keys


class NanGuard(Callback):
  """Stops training when a watched metric is NaN or infinite; the step is not checkpointed.

  The last good checkpoint stays intact and the run ends with ``result.failed`` set.
  """

  def __init__(self, keys: Sequence[str] = ("loss", "grad_norm")):
    self.keys = _metric_names(keys, "NanGuard")

  def on_step(self, loop, step, metrics):
    for key in self.keys:
      value = metrics.get(key)
      if value is not None and not math.isfinite(value):
        loop.fail(f"{key} is {value} at step {step}; training stopped")
        return


class EarlyStopping(Callback):
  """Stops when ``monitor`` (an eval metric by default) has not improved by ``min_delta`` for ``patience`` evals."""

  def __init__(self, monitor: str = "eval_loss", *, patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
    if mode not in ("min", "max"):
      raise ValueError(f"Unknown mode: {mode!r}. It needs to be one of ['min', 'max'].")
    if patience < 1:
      raise ValueError(f"patience must be >= 1, got {patience}.")
    self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
    self.best: float | None = None
    self.bad = 0

  def _check(self, loop, step, metrics, where):
    if self.monitor not in metrics:  # a name this run never logs would leave the callback inert, silently
      raise ValueError(f"EarlyStopping monitors {self.monitor!r}, but the run's {where} report "
                       f"{sorted(k for k in metrics if k != 'step')}. Pass one of those (evaluation metrics "
                       f"carry the prefix 'eval_').")
    value = metrics[self.monitor]
    sign = 1.0 if self.mode == "min" else -1.0
    if self.best is None or sign * (self.best - value) > self.min_delta:
      self.best, self.bad = value, 0
    else:
      self.bad += 1
      if self.bad >= self.patience:
        loop.request_stop(f"early stopping at step {step}: {self.monitor} did not improve on {self.best:.6g} "
                          f"for {self.patience} evaluations")

  def on_start(self, loop, step):
    if self.monitor.startswith("eval_") and not loop.evaluates:
      raise ValueError(f"EarlyStopping monitors {self.monitor!r}, an evaluation metric, but the run has no eval_fn: "
                       f"pass eval_fn and eval_data to fit, or monitor a training metric such as 'loss'.")

  def get_state(self) -> dict[str, Any]:
    return {"best": self.best, "bad": self.bad}

  def set_state(self, state: dict[str, Any]) -> None:
    self.best, self.bad = state["best"], int(state["bad"])

  def on_eval(self, loop, step, metrics):
    if self.monitor.startswith("eval_"):
      self._check(loop, step, metrics, "evaluations")

  def on_step(self, loop, step, metrics):
    if not self.monitor.startswith("eval_"):
      self._check(loop, step, metrics, "steps")


class PrintLogger(Callback):
  """Prints one line of metrics every ``every`` steps and after each evaluation."""

  def __init__(self, every: int = 10, keys: Sequence[str] | None = None, print_fn=print):
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
      raise ValueError(f"PrintLogger every must be a positive int (steps between lines), got {every!r}.")
    self.every, self.print_fn = every, print_fn
    self.keys = _metric_names(keys, "PrintLogger") if keys is not None else None

  def _fmt(self, metrics):
    keys = self.keys or [k for k in metrics if k != "step"]
    return "  ".join(f"{k} {metrics[k]:.5g}" for k in keys if k in metrics and isinstance(metrics[k], (int, float)))

  def on_step(self, loop, step, metrics):
    if step % self.every == 0:
      self.print_fn(f"step {step:6d}  {self._fmt(metrics)}")

  def on_eval(self, loop, step, metrics):
    self.print_fn(f"eval {step:6d}  {self._fmt(metrics)}")


class ProgressBar(Callback):
  """A rich progress bar with the steps done, the latest loss and the time remaining."""

  def __init__(self, description: str = "training", *, transient: bool = False):
    self.description, self.transient = description, transient
    self._progress: Any = None

  def on_start(self, loop, step):
    from rich.markup import escape
    from rich.progress import (
      BarColumn,
      MofNCompleteColumn,
      Progress,
      TextColumn,
      TimeRemainingColumn,
    )

    self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                              transient=self.transient)
    self._progress.start()
    # escaped: rich reads "[pmap]" in a strategy's name as markup and would drop it
    self._task = self._progress.add_task(escape(self.description), total=loop.total_steps, completed=step, loss="-")

  def on_step(self, loop, step, metrics):
    self._progress.update(self._task, completed=step, loss=f"{metrics.get('loss', float('nan')):.4f}")

  def on_end(self, loop, result):
    if self._progress is not None:
      self._progress.stop()
