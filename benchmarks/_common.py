"""Shared benchmark helpers: device setup, interleaved timing, tables and JSON output."""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence


def setup_devices(n: int = 8) -> None:
  """Emulates ``n`` CPU devices on a CPU-only host; call before JAX starts."""
  import jdist

  jdist.emulate_devices(n)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, steps: int, rounds: int,
                     warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each fn, timed in alternating rounds so drift hits all alike.

  Each fn runs one step and returns something to block on; each runs ``warmup`` times first (the first
  call compiles).
  """
  import jax

  for fn in fns.values():
    for _ in range(warmup):
      out = fn()
    jax.block_until_ready(out)
  samples: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t) / steps)
  return {k: statistics.median(v) for k, v in samples.items()}


def time_against_hand(strategy, state, hand: Callable, hand_state: tuple, batch, *, steps: int,
                      rounds: int) -> tuple[dict[str, float], Any, tuple]:
  """Median seconds per step of ``strategy.step`` and of a hand-written ``hand(*hand_state, batch) ->
  (*hand_state, loss)`` on the same batch, timed in interleaved rounds (``time_interleaved``).

  Returns ``({"jdist": s, "hand": s}, jdist's last state, the hand-written step's last state)``; both
  steps donate their state, so use these, not the ones passed in.
  """
  box = {"jdist": state, "hand": hand_state}

  def run_jdist():
    box["jdist"], metrics = strategy.step(box["jdist"], batch)
    return metrics["loss"]

  def run_hand():
    *box["hand"], loss = hand(*box["hand"], batch)
    return loss

  times = time_interleaved({"jdist": run_jdist, "hand": run_hand}, steps=steps, rounds=rounds)
  return times, box["jdist"], tuple(box["hand"])


def save_figure(fig, name: str) -> pathlib.Path:
  """Saves ``fig`` as ``bench_results/NAME.png`` (or under $JDIST_BENCH_OUT, like ``write_json``)."""
  out = pathlib.Path(os.environ.get("JDIST_BENCH_OUT", "bench_results"))
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.png"
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")
  return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  from rich.console import Console
  from rich.table import Table

  table = Table(title=title)
  for i, c in enumerate(columns):
    table.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
  for row in rows:
    table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
  Console(width=None if Console().is_terminal else 160).print(table)


def write_json(name: str, payload: dict[str, Any]) -> pathlib.Path:
  """Writes ``bench_results/NAME.json`` (or under $JDIST_BENCH_OUT) and returns its path."""
  out = pathlib.Path(os.environ.get("JDIST_BENCH_OUT", "bench_results"))
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=str))
  print(f"wrote {path}")
  return path
