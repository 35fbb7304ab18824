"""How planning time grows with the device count and the model size (on this machine's CPU).

A plan costs every candidate layout by the textbook (microseconds each) and compiles a few (the top ones, at 2
and 4 layers per stage) on emulated CPU devices: the compiles are the time. This script measures both parts:
the textbook pass for 8 to 4096 devices, and one compile of a 2-layer FSDP step of jdist's GPT for several
device counts and widths (fresh, without the cache).

  python benchmarks/plan_scaling.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax.numpy as jnp  # noqa: E402

from _common import write_json  # noqa: E402
from jdist.analysis.plan import plan  # noqa: E402
from jdist.analysis.plan._compile import CompileJob, run_jobs  # noqa: E402
from jdist.analysis.plan._config import model_fields  # noqa: E402
from jdist.models import gpt  # noqa: E402

WIDTHS = {"1B": (2048, 16, 16), "7B": (4096, 32, 32), "13B": (5120, 40, 40)}


def config(name: str, layers: int | None = None) -> gpt.GPTConfig:
  d, n_layers, heads = WIDTHS[name]
  return gpt.GPTConfig(vocab_size=32768, seq_len=2048, d_model=d, n_layers=layers or n_layers, n_heads=heads,
                       compute_dtype=jnp.bfloat16, attention_impl="xla")


def textbook_pass(devices: int) -> dict:
  start = time.perf_counter()
  p = plan(config("7B"), "h100-8x", devices=devices, batch=max(256, devices), compile=False)
  return {"devices": devices, "layouts": len(p.rows), "seconds": time.perf_counter() - start}


def one_compile(name: str, devices: int, batch_per_device: int = 1) -> dict:
  job = CompileJob(model=tuple(sorted(model_fields(config(name, layers=2)).items())), strategy="sharded",
                   axes=(("fsdp", devices),), batch=batch_per_device * devices)
  start = time.perf_counter()
  result = run_jobs([job], cache=False)[0]
  return {"model": name, "devices": devices, "compile_s": result["compile_seconds"],
          "with_process_s": time.perf_counter() - start}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer points")
  args = parser.parse_args(argv)
  out = {"textbook": [textbook_pass(n) for n in (8, 64, 512, 4096)]}
  print("| devices | candidate layouts | textbook pass (s) |\n|---|---|---|")
  for r in out["textbook"]:
    print(f"| {r['devices']} | {r['layouts']} | {r['seconds']:.3f} |")
  points = [("7B", 8), ("7B", 64)] if args.quick else [("7B", 8), ("7B", 16), ("7B", 32), ("7B", 64), ("1B", 64),
                                                        ("13B", 64)]
  out["compile"] = [one_compile(name, n) for name, n in points]
  print("\n| model (2 layers compiled) | devices | one compile (s) | with the worker process (s) |\n|---|---|---|---|")
  for r in out["compile"]:
    print(f"| {r['model']} | {r['devices']} | {r['compile_s']:.1f} | {r['with_process_s']:.1f} |")
  write_json("plan_scaling", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
