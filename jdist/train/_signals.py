"""SIGINT and SIGTERM while ``fit`` runs: finish the step, save a checkpoint, say where the run resumes, then stop.

The contract: the handlers only note the signal; the loop finishes the step it is running, writes a checkpoint
of it (when ``fit`` has a ``CheckpointConfig``), prints where the run will resume, then raises ``Interrupted``
(a ``KeyboardInterrupt``, for SIGINT) or ``Terminated`` (a ``SystemExit`` with code 143, for SIGTERM), so that
a script's code after ``fit`` does not run as if training had finished; ``jdist train`` exits with 130 / 143.
A second SIGINT while the first is being handled stops at once (a plain ``KeyboardInterrupt``, no save).

Several processes must save the same step (a save is collective). There the loop asks JAX's preemption sync
point (``multihost_utils.reached_preemption_sync_point``, set up by ``jax.distributed.initialize``) after every
step: once any process got SIGTERM, every process learns the same step to stop at, the first that none has
passed. JAX's coordination service catches SIGTERM itself, so no Python handler is installed for it; a SIGINT
is turned into a SIGTERM to this process, which enters the same protocol.

Handlers are installed only in the main thread (the only one Python delivers signals to) and the previous ones
are put back when ``fit`` returns.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any


class Interrupted(KeyboardInterrupt):
  """``fit`` stopped on SIGINT after saving. Attributes: ``step`` (the last step run), ``checkpoint`` (its path,
  or None when nothing was saved)."""

  def __init__(self, message: str, step: int, checkpoint: str | None):
    super().__init__(message)
    self.step, self.checkpoint = step, checkpoint


class Terminated(SystemExit):
  """``fit`` stopped on SIGTERM after saving: a ``SystemExit`` with code 143 (128 + SIGTERM, what a shell reports
  for a process killed by it). Attributes as ``Interrupted``, and ``message``."""

  def __init__(self, message: str, step: int, checkpoint: str | None):
    super().__init__(128 + signal.SIGTERM)
    self.message, self.step, self.checkpoint = message, step, checkpoint

  def __str__(self) -> str:
    return self.message


class Interrupts:
  """A context manager that notes SIGINT / SIGTERM for the loop; ``stop_after(step)`` says whether to stop now."""

  def __init__(self):
    self.received: int | None = None  # the signal this process got
    self.previous: dict[int, Any] = {}
    self.sync = _preemption_sync()

  def __enter__(self) -> "Interrupts":
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self.sync else (signal.SIGINT, signal.SIGTERM)
      for sig in signals:
        self.previous[sig] = signal.signal(sig, self._note)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self.previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self.previous = {}

  def _note(self, signum: int, frame: Any) -> None:
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
    self.received = signum
    if self.sync:  # several processes: let JAX's coordination service agree on the step to stop at
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_after(self, step: int) -> bool:
    """Called once after each step is dispatched, with its number (the same numbers in every process)."""
    if self.sync:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None

  @property
  def name(self) -> str:
    """The signal to report: this process's, else SIGTERM (another process's, through the sync point)."""
    return signal.Signals(self.received or signal.SIGTERM).name

  def error(self, message: str, step: int, checkpoint: str | None) -> BaseException:
    if (self.received or signal.SIGTERM) == signal.SIGINT:
      return Interrupted(message, step, checkpoint)
    return Terminated(message, step, checkpoint)


def _preemption_sync() -> bool:
  """Whether this is a multi-process run with JAX's preemption sync manager (on unless
  ``jax_enable_preemption_service`` is off)."""
  import jax

  if jax.process_count() == 1:
    return False
  from jax._src import distributed

  return distributed.global_state.preemption_sync_manager is not None
