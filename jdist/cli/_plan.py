"""``jdist plan CONFIG --cluster NAME|FILE [--devices N]``: rank the layouts for a GPT config on a cluster."""
from __future__ import annotations

import argparse
import pathlib


def add_parser(sub) -> None:
  plan = sub.add_parser("plan", help="choose a layout for a GPT config on a cluster (compiled from shapes, on this "
                        "machine) and write it as a ready config")
  plan.add_argument("config", help="a TOML file with [model] name = \"gpt\" and its sizes, [data] batch_size, e.g. "
                    "examples/plan/gpt_7b.toml")
  plan.add_argument("--cluster", required=True, help="a shipped cluster (h100-8x, h200-8x, a100-8x, tpu-v5e-256, "
                    "tpu-v5p, tpu-v4, cpu) or your own TOML file of the same keys")
  plan.add_argument("--devices", type=int, default=None, help="devices to plan for (default: the cluster file's)")
  plan.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: data.batch_size)")
  plan.add_argument("--top", type=int, default=12, help="rows of the table to print (0: all)")
  plan.add_argument("--compile-top", type=int, default=6, help="best layouts to compile for real (0: none)")
  plan.add_argument("--max-compile-devices", type=int, default=64,
                    help="emulate at most this many CPU devices to compile a layout (wider data axes are costed)")
  plan.add_argument("--cache", default=None, help="directory of compiled results (default ~/.cache/jdist/plan)")
  plan.add_argument("--out", default=None, help="write the best layout's config here (default: print it)")
  plan.add_argument("--rank-by", choices=("textbook", "compiled"), default="textbook",
                    help="rank by the step time from the textbook's collective bytes (default) or from the compiled "
                    "program's (conservative: XLA:CPU's partitioning)")
  plan.add_argument("--explain", type=int, default=1, help="print the details of the first N rows (default 1)")


def plan_command(args: argparse.Namespace) -> int:
  from jdist.analysis.plan import load_cluster, read_plan_config

  cluster = load_cluster(args.cluster, args.devices)  # no JAX yet: the devices to emulate come from here
  if args.max_compile_devices < 1:
    raise ValueError(f"--max-compile-devices must be a positive int, got {args.max_compile_devices}.")
  import jdist

  jdist.emulate_devices(min(cluster.devices, args.max_compile_devices))
  from jdist.analysis.plan import plan

  model, batch, optimizer = read_plan_config(args.config)
  result = plan(model, cluster, batch=args.batch or batch, optimizer=optimizer, compile=args.compile_top > 0,
                compile_top=args.compile_top, max_compile_devices=args.max_compile_devices, cache=args.cache,
                rank_by=args.rank_by)
  print(result.table(top=args.top or None))
  for i in range(min(args.explain, len(result.rows))):
    print()
    print(result.explain(i))
  text = result.config()  # raises DoesNotFitError (the CLI's one-line error) when nothing fits
  if args.out:
    pathlib.Path(args.out).write_text(text)
    print(f"\nbest layout written to {args.out}")
  else:
    print("\n" + text, end="")
  return 0
