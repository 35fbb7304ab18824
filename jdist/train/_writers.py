"""Metric logs in the run directory: JSON lines (and TensorBoard events).

``metrics.jsonl`` holds what the model computed (step, loss, grad_norm, eval metrics, ...): it is
deterministic, so a resumed run writes a file identical byte for byte to an uninterrupted one.
``timing.jsonl`` holds what the clock measured (steps/s, examples/s, wall time), which no two runs
share. On resume both are cut back to the restored step before new lines are appended.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

METRICS_FILE = "metrics.jsonl"
TIMING_FILE = "timing.jsonl"


def _clean(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN / Infinity
  return value


def truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
  """Drops every line of ``path`` whose step is after ``last_step`` (and any partial last line)."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines(keepends=True):
    if not line.endswith("\n"):
      break  # a line cut by a crash
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      break
    if record.get("step", 0) <= last_step:
      keep.append(line)
  path.write_text("".join(keep))


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """All records of a JSON-lines file. A last line without its newline (cut by a crash, or still being
  written by a running job) is left out; a damaged line anywhere else is an error."""
  text = pathlib.Path(path).read_text()
  lines = text.splitlines()
  if lines and not text.endswith("\n"):
    lines = lines[:-1]
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}).") from None
      if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
        raise ValueError(f"{path}, line {number}: expected an object with an integer 'step', as jdist.fit writes, "
                         f"got {line[:80]!r}.")
      records.append(record)
  return records


class JsonlWriter:
  """Appends one JSON object per line and flushes it, so a crash loses at most the line in flight."""

  def __init__(self, path: pathlib.Path, *, resume_step: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    truncate_jsonl(path, resume_step)
    self._file = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardWriter:
  """Scalars as TensorBoard event files under ``run_dir/tensorboard`` (via tensorboardX)."""

  def __init__(self, directory: pathlib.Path, *, resume_step: int):
    from tensorboardX import SummaryWriter

    # events after resume_step are dropped, as metrics.jsonl drops its records: a run restarted from step 0
    # in the same directory does not overlay the old one
    self._writer = SummaryWriter(str(directory), purge_step=resume_step + 1)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
      if key != "step" and isinstance(value, (int, float)):
        self._writer.add_scalar(key, value, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
