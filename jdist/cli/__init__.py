"""The ``jdist`` command line: ``demo``, ``train``, ``plot`` and ``bench``.

The CLI only parses arguments into config dataclasses and calls library functions. Bad input ends
with a one-line message on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jdist", description="Distributed training in JAX, equal to one device.")
  sub = parser.add_subparsers(dest="command", required=True)

  demo = sub.add_parser("demo", help="train the digits MLP with every strategy and compare them")
  demo.add_argument("--quick", action="store_true", help="fewer steps: finishes in under a minute on a laptop")
  demo.add_argument("--steps", type=int, default=None, help="steps per strategy (default 400, --quick 150)")
  demo.add_argument("--out", default="runs/demo", help="directory for run logs and the loss-curve PNG")
  demo.add_argument("--devices", type=int, default=8, help="CPU devices to emulate on a CPU-only host")

  train = sub.add_parser("train", help="train from a TOML config; resumes from checkpoints in its run_dir")
  train.add_argument("config", help="a TOML config file, e.g. examples/configs/data_parallel.toml")
  train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config entry, e.g. --set optimizer.lr=0.1 (repeatable)")
  train.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

  plot = sub.add_parser("plot", help="plot logged metrics of run directories as a PNG")
  plot.add_argument("run_dirs", nargs="+")
  plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png of the first run)")
  plot.add_argument("--metric", dest="metrics", action="append", default=None, help="metric to draw (repeatable)")

  bench = sub.add_parser("bench", help="run the benchmarks/ suite and print its tables")
  bench.add_argument("names", nargs="*", help="benchmark names (default: all), e.g. data_parallel")
  bench.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
  return parser


def _emulate(n: int) -> None:
  import jdist

  jdist.emulate_devices(n) if n > 1 else None


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from jdist.config import ConfigError
  from jdist.train import CheckpointError

  try:
    if args.command == "demo":
      _emulate(args.devices)
      from jdist.cli._demo import demo

      return demo(quick=args.quick, steps=args.steps, out=args.out)
    if args.command == "train":
      from jdist import config as config_lib

      cfg = config_lib.load(args.config, args.overrides)
      _emulate(cfg.mesh.cpu_devices)
      from jdist.cli._train import train

      return train(cfg, quiet=args.quiet)
    if args.command == "plot":
      from jdist.plot import plot_runs

      out = args.out or os.path.join(args.run_dirs[0], "metrics.png")
      print(plot_runs(args.run_dirs, out, metrics=args.metrics))
      return 0
    if args.command == "bench":
      from jdist.cli._bench import bench

      return bench(args.names, quick=args.quick)
  except (ConfigError, CheckpointError, ValueError, TypeError, OSError, ImportError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"jdist {args.command}: error: {message}", file=sys.stderr)
    return 2 if isinstance(e, ConfigError) else 1
  except KeyboardInterrupt:
    print(f"jdist {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
