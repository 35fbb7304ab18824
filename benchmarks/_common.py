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


def time_interleaved(fns: dict[str, Callable[[], Any]], *, steps: int, rounds: int, warmup: int = 1,
                     steps_per_call: dict[str, int] | None = None) -> dict[str, float]:
  """Median seconds per step of each fn, timed in interleaved rounds so drift hits all alike (the order
  within a round reverses every other round, so no fn always runs first).

  Each fn runs one step and returns something to block on, or ``steps_per_call[name]`` steps (a fn that
  drives a whole loop, e.g. ``jdist.fit``; ``steps`` must be a multiple of it). A round runs ``steps``
  steps of each; each fn is called ``warmup`` (>= 1) times first: the first call compiles.
  """
  import jax

  if warmup < 1:
    raise ValueError(f"warmup must be >= 1 (the first call compiles), got {warmup}.")
  per_call = {name: (steps_per_call or {}).get(name, 1) for name in fns}
  for name, k in per_call.items():
    if steps % k:
      raise ValueError(f"steps={steps} is not a multiple of {name}'s {k} steps per call.")
  for fn in fns.values():
    for _ in range(warmup):
      out = fn()
    jax.block_until_ready(out)
  samples: dict[str, list[float]] = {k: [] for k in fns}
  for r in range(rounds):
    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      t = time.perf_counter()
      for _ in range(steps // per_call[name]):
        out = fns[name]()
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
    table.add_row(*[f"{v:.4g}" if isinstance(v, float) else "-" if v is None else str(v) for v in row])
  Console(width=None if Console().is_terminal else 200).print(table)


def write_json(name: str, payload: dict[str, Any]) -> pathlib.Path:
  """Writes ``bench_results/NAME.json`` (or under $JDIST_BENCH_OUT) and returns its path."""
  out = pathlib.Path(os.environ.get("JDIST_BENCH_OUT", "bench_results"))
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=str))
  print(f"wrote {path}")
  return path
