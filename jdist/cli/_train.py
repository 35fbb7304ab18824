"""``jdist train CONFIG``: train from a config file and print a summary."""
from __future__ import annotations

import sys

from jdist.config import Config


def train(config: Config, *, quiet: bool = False) -> int:
  from jdist.experiment import run

  exp, result = run(config, callbacks=[_SayResumed(config)], quiet=quiet)
  last = result.history[-1] if result.history else {}
  evals = result.eval_history[-1] if result.eval_history else {}
  summary = [f"strategy {exp.strategy.name}", f"devices {exp.strategy.mesh.size}", f"step {int(result.state.step)}"]
  if "loss" in last:
    summary.append(f"loss {last['loss']:.6g}")
  summary += [f"{k} {v:.4g}" for k, v in evals.items() if k != "step"]
  print("  ".join(summary))
  if result.stop_reason:
    print(f"jdist train: {'error: ' if result.failed else ''}{result.stop_reason}",
          file=sys.stderr if result.failed else sys.stdout)
  return 1 if result.failed else 0


class _SayResumed:
  """Says where a resumed run starts, before its first step (and before the progress bar)."""

  def __init__(self, config: Config):
    self.config = config

  def on_start(self, loop, step):
    if step:
      print(f"resumed from step {step} ({self.config.run_dir}/checkpoints)", flush=True)
