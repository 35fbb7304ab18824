"""``jdist train CONFIG``: train from a config file and print a summary."""
from __future__ import annotations

import pathlib
import signal
import sys

from jdist.config import Config


def train(config: Config, *, quiet: bool = False, allow_config_change: bool = False) -> int:
  """Trains ``config`` (``jdist.experiment.run``); returns the exit status: 0, 1 on a failed run, 130 / 143 after
  SIGINT / SIGTERM (the step running was finished and saved; ``fit`` said where the run resumes)."""
  import jax

  from jdist.experiment import record_event, run
  from jdist.train import Interrupted, Terminated

  run_dir = pathlib.Path(config.run_dir)
  if jax.process_index() == 0:
    print(f"run dir {run_dir}", flush=True)
  try:
    exp, result = run(config, quiet=quiet, allow_config_change=allow_config_change)
  except (Interrupted, Terminated) as e:
    sig = signal.SIGINT if isinstance(e, Interrupted) else signal.SIGTERM
    if jax.process_index() == 0:
      record_event(run_dir, "interrupted", signal=sig.name, step=e.step, checkpoint=e.checkpoint)
    return 128 + sig
  if jax.process_index() == 0:
    record_event(run_dir, "failed" if result.failed else "ended", step=int(result.state.step),
                 stop_reason=result.stop_reason)
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
