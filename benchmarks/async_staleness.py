"""The staleness study: SSP bounds x schedule keys x update rules on the digits MLP (examples/async_sgd.py's part 2).

8 workers of 16 examples pause half the time; bounds s in {0, 1, 2, 4, 16, none}; ``apply="mean"`` at SGD lr 0.3
and ``apply="each"`` at lr 0.075 (the same expected step per tick); 10 schedule keys per configuration (the key
given to ``init``: the batches and initial parameters stay the same). Per configuration: the median and range over
keys of the final loss (the per-tick loss metric, averaged over the last 10% of ticks), of the server's final
train-set loss and of the test accuracy; the dead runs; the updates applied; the server's train loss at the number
of updates every run of the rule reached; the workers waiting at the gate; the ticks to a train loss of 0.3.
Writes bench_results/async_staleness.json and .png, and prints the table as markdown for benchmarks/RESULTS.md.

Run: python benchmarks/async_staleness.py [--quick] [--keys 10] [--ticks 600]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, setup_devices, write_json  # noqa: E402

setup_devices(8)

import jax  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "async_sgd.py"


def load_study():
  spec = importlib.util.spec_from_file_location("async_sgd_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3 keys, 300 ticks")
  parser.add_argument("--keys", type=int, default=10)
  parser.add_argument("--ticks", type=int, default=600)
  args = parser.parse_args()
  keys, ticks = (3, 300) if args.quick else (args.keys, args.ticks)
  study = load_study()
  start = time.perf_counter()
  results = study.staleness_runs(study.BOUNDS, study.RULES, tuple(range(keys)), ticks)
  seconds = time.perf_counter() - start
  rows = study.table(results)
  print_table(f"async SGD staleness study: digits MLP, {study.WORKERS} workers pausing {study.PAUSE:.0%} of ticks, "
              f"{ticks} ticks, {keys} keys; median (range) over keys ({seconds:.0f} s on "
              f"{jax.devices()[0].platform})", study.HEADER, rows)
  print("\n| " + " | ".join(study.HEADER) + " |\n|" + "---|" * len(study.HEADER))
  for row in rows:
    print("| " + " | ".join(row) + " |")
  out = pathlib.Path(os.environ.get("JDIST_BENCH_OUT", "bench_results"))
  png = study.plot(results, out / "async_staleness.png")
  print(f"wrote {png}")
  per_key = ("final_loss", "train_loss", "accuracy", "dead", "updates", "gradients", "waiting", "loss_at_updates",
             "ticks_to_target")
  write_json("async_staleness", {
      "ticks": ticks, "keys": keys, "workers": study.WORKERS, "pause_prob": study.PAUSE, "seconds": seconds,
      "platform": jax.devices()[0].platform,
      "results": {f"{rule}, s={'none' if bound is None else bound}": {
          "summary": study.summary(runs), **{k: runs[k] for k in per_key}} for (rule, bound), runs in results.items()}})


if __name__ == "__main__":
  main()
