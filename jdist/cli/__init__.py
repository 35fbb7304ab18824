"""The ``jdist`` command line: ``demo``, ``train``, ``plot``, ``bench``, ``launch`` and ``plan``.

The CLI only parses arguments into config dataclasses and calls library functions. Bad input ends
with a one-line message on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


class _Version(argparse.Action):
  """``jdist --version``: jdist's version, and JAX's and Python's (jdist is imported only when asked)."""

  def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
    super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    import platform

    import jax

    import jdist

    print(f"jdist {jdist.__version__} (jax {jax.__version__}, Python {platform.python_version()})")
    parser.exit()


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jdist", description="Distributed training in JAX, equal to one device.")
  parser.add_argument("--version", action=_Version, help="print the versions of jdist, JAX and Python, and exit")
  sub = parser.add_subparsers(dest="command", required=True)

  demo = sub.add_parser("demo", help="train the digits MLP with every strategy and compare them")
  demo.add_argument("--quick", action="store_true", help="fewer steps: about a minute on a laptop")
  demo.add_argument("--steps", type=int, default=None, help="steps per strategy (default 400, --quick 150)")
  demo.add_argument("--out", default="runs/demo", help="directory for run logs and the loss-curve PNG")
  demo.add_argument("--devices", type=int, default=8, help="CPU devices to emulate on a CPU-only host")

  train = sub.add_parser("train", help="train from a TOML config; resumes from checkpoints in its run_dir")
  train.add_argument("config", help="a TOML config file, e.g. examples/configs/data_parallel.toml")
  train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config entry, e.g. --set optimizer.lr=0.1 (repeatable)")
  train.add_argument("--unset", action="append", default=[], metavar="SECTION.KEY",
                     help="drop an entry the config file sets, as if it were not there, e.g. --unset "
                          "optimizer.momentum (repeatable; applied before --set)")
  train.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
  train.add_argument("--allow-config-change", action="store_true",
                     help="resume a run dir whose checkpoints were written with another config (the change is "
                          "recorded in RUN_DIR/events.jsonl); without it such a resume is refused")

  plot = sub.add_parser("plot", help="plot logged metrics of run directories as a PNG")
  plot.add_argument("run_dirs", nargs="+")
  plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png of the first run)")
  plot.add_argument("--metric", dest="metrics", action="append", default=None, help="metric to draw (repeatable)")

  bench = sub.add_parser("bench", help="run the benchmarks/ suite and print its tables")
  bench.add_argument("names", nargs="*", help="benchmark names (default: all), e.g. data_parallel")
  bench.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")

  launch = sub.add_parser("launch", help="run a command as P local processes joined by jax.distributed",
                          usage="jdist launch -n P [--devices-per-process D] [--timeout S] [--max-restarts K "
                                "[--min-processes M]] -- COMMAND ...")
  launch.add_argument("-n", "--num-processes", type=int, required=True, help="number of processes")
  launch.add_argument("--devices-per-process", type=int, default=None, help="CPU devices each process emulates")
  launch.add_argument("--timeout", type=float, default=None, help="start-up timeout in seconds (default 60)")
  launch.add_argument("--heartbeat-timeout", type=int, default=None,
                      help="seconds without heartbeats before JAX declares a process dead (default 30)")
  launch.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL after a failure")
  launch.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
  launch.add_argument("--max-restarts", type=int, default=0, metavar="K",
                      help="restart every process after a failure, at most K times; the run resumes from its last "
                           "checkpoint (default 0)")
  launch.add_argument("--min-processes", type=int, default=None, metavar="M",
                      help="after a failure, drop the slots whose process never reaches jdist.distributed.initialize "
                           "(lost hosts) and go on with the rest, down to M (default: -n, never fewer)")
  launch.add_argument("--checkpoint-dir", default=None,
                      help="the run's checkpoint directory, to log the step each restart resumes from (jdist train: "
                           "read from its config)")
  launch.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --, e.g. -- jdist train CONFIG")

  from jdist.cli._plan import add_parser as add_plan_parser

  add_plan_parser(sub)
  return parser


def _emulate(n: int) -> None:
  import jdist

  jdist.emulate_devices(n) if n > 1 else None


def _quiet_closed_loops() -> None:
  """Drops the known harmless tracebacks of a failed checkpoint read: orbax leaves its reads' asyncio
  tasks behind ("Task exception was never retrieved", logged by asyncio), and the reads still in flight
  when the loop closes post to it from tensorstore's threads ("Event loop is closed"): from Python
  threads through ``threading.excepthook``, from tensorstore's own threads through
  ``sys.unraisablehook``. The CLI has reported the failure in one line; every other error is shown.
  (The process is the CLI's, so it may set these process-wide hooks; the library itself does not.)"""
  import logging
  import threading

  logging.getLogger("asyncio").setLevel(logging.CRITICAL)

  def quiet(default):
    """``default`` (a thread or unraisable hook) without the closed-loop reports; installed once."""
    if getattr(default, "jdist_quiet", False):
      return default

    def hook(args):
      if not (isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value)):
        default(args)

    hook.jdist_quiet = True
    return hook

  threading.excepthook = quiet(threading.excepthook)
  sys.unraisablehook = quiet(sys.unraisablehook)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from jdist.config import ConfigError
  from jdist.distributed import DistributedError
  from jdist.train import CheckpointError

  _quiet_closed_loops()
  try:
    if args.command == "demo":
      if args.devices < 1:
        raise ValueError(f"--devices must be a positive int (CPU devices to emulate), got {args.devices}.")
      _emulate(args.devices)
      from jdist.cli._demo import demo

      return demo(quick=args.quick, steps=args.steps, out=args.out)
    if args.command == "train":
      from jdist import config as config_lib

      cfg = config_lib.load(args.config, args.overrides, args.unset)
      from jdist import distributed

      if distributed.requested():  # started by `jdist launch` (or JDIST_* set by hand): join the others first
        distributed.initialize(local_device_count=None if os.environ.get(distributed.ENV_LOCAL_DEVICES)
                               else cfg.mesh.cpu_devices)
      else:
        _emulate(cfg.mesh.cpu_devices)
      from jdist.cli._train import train

      return train(cfg, quiet=args.quiet, allow_config_change=args.allow_config_change)
    if args.command == "plot":
      from jdist.analysis.plot import plot_runs

      out = args.out or os.path.join(args.run_dirs[0], "metrics.png")
      print(plot_runs(args.run_dirs, out, metrics=args.metrics))
      return 0
    if args.command == "bench":
      from jdist.cli._bench import bench

      return bench(args.names, quick=args.quick)
    if args.command == "plan":
      from jdist.cli._plan import plan_command

      return plan_command(args)
    if args.command == "launch":
      from jdist.cli._launch import launch

      cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
      return launch(cmd, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                    timeout_s=args.timeout, heartbeat_timeout_s=args.heartbeat_timeout, grace_s=args.grace,
                    port=args.port, max_restarts=args.max_restarts, min_processes=args.min_processes,
                    checkpoint_dir=args.checkpoint_dir)
  except (ConfigError, CheckpointError, DistributedError, ValueError, TypeError, OSError, ImportError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"jdist {args.command}: error: {message}", file=sys.stderr)
    return 2 if isinstance(e, ConfigError) else 1
  except KeyboardInterrupt:
    print(f"jdist {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


def entry() -> None:
  """The console script: ``main``, then on failure an exit that skips interpreter shutdown.

  After a failed checkpoint read, orbax's background threads would print tracebacks while Python shuts
  down ("Event loop is closed"), after our one-line message; a failing run has nothing left to save.
  """
  code = main()
  if code:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(0)


if __name__ == "__main__":
  entry()
