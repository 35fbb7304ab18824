"""Pipeline parallelism: step time against the sequential single-device step, the bubble and the memory, as m grows.

The GPT (one block per stage) on p=4 pipe devices with the GPipe, circular (v=2, 8 layers) and 1F1B
schedules, m in {1, 2, 4, 8, 16, 32} micro-batches, the same global batch each time. Reported per m: the
pipeline's step time, the sequential step on one device (same batch, same run), their ratio, the bubble
measured from the schedule that ran and the textbook (p-1)/(m v+p-1), and XLA's temporary memory per
device for the compiled step (``memory_analysis().temp_size_in_bytes``: activations kept for the
backward, stashes, gradient buffers). A second table holds the micro-batch fixed (4 sequences) and grows
m, as a pipeline that feeds more micro-batches to shrink the bubble does: GPipe's and circular's memory
grows with m, 1F1B's does not. A third checks what that growth is made of: one 512 x 512 layer per
virtual stage and 1-row micro-batches (2 KiB of activations), where a copy of the weights per tick would
show as ~1 MiB per micro-batch (issue 18). On emulated CPU devices the 4 stages share 2 cores, so the
ratio shows the schedule's overhead, not a speed-up, and the memory figures are XLA:CPU's. Writes
bench_results/pipeline.json and bench_results/pipeline.png.

Run: python benchmarks/pipeline.py [--quick] [--memory-only]  (--memory-only: compile, do not time)
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
  print_table,
  save_figure,
  setup_devices,
  time_interleaved,
  write_json,
)

setup_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.strategies.pipeline import pipeline  # noqa: E402

SCHEDULES = (("gpipe", 4, None), ("circular", 8, 2), ("1f1b", 4, None))  # (schedule, GPT layers, repeats)
MiB = 2**20


def temp_bytes(strategy, state, batch) -> int:
  """XLA's temporary buffers per device for one compiled step (params, optimizer state and batch excluded)."""
  return strategy.step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--memory-only", action="store_true", help="compile and report memory, do not time steps")
  args = parser.parse_args()
  p = 4
  ms = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32]
  steps, rounds = (2, 2) if args.quick else (5, 3)
  rows, records = [], []
  opt = optax.adam(1e-3)
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  for schedule, layers, repeats in SCHEDULES:
    cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=layers, n_heads=4)
    stage_fn, loss_fn, input_fn, to_pipeline = gpt.pipeline_fns(cfg)
    params = gpt.init(jax.random.key(0), cfg)
    batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), 32, cfg))
    seq = jdist.data_parallel(gpt.loss_fn(cfg), opt, jdist.make_mesh(data=1, devices=jax.devices()[:1]))
    for m in ms:
      strategy = pipeline(stage_fn, loss_fn, opt, mesh, microbatches=m, schedule=schedule, repeats=repeats,
                          input_fn=input_fn)
      box = {"pipe": strategy.init(to_pipeline(params)), "seq": seq.init(params)}
      pb, sb = strategy.shard_batch(batch), seq.shard_batch(batch)
      temp = temp_bytes(strategy, box["pipe"], pb)
      out = {}

      def run_pipe():
        box["pipe"], out["pipe"] = strategy.step(box["pipe"], pb)
        return out["pipe"]["loss"]

      def run_seq():
        box["seq"], metrics = seq.step(box["seq"], sb)
        return metrics["loss"]

      if args.memory_only:
        times = {"pipeline": float("nan"), "sequential": float("nan")}
        out["pipe"] = {"bubble": strategy.info["schedule"].bubble}  # what the step counts while running
      else:
        times = time_interleaved({"pipeline": run_pipe, "sequential": run_seq}, steps=steps, rounds=rounds)
      sched = strategy.info["schedule"]
      bubble = float(out["pipe"]["bubble"])
      ratio = times["pipeline"] / times["sequential"]
      rows.append((schedule, m, times["pipeline"] * 1e3, times["sequential"] * 1e3, ratio, bubble,
                   sched.expected_bubble(), int(sched.peak_stash.max()), temp / MiB))
      records.append({"schedule": schedule, "microbatches": m, "pipeline_ms": times["pipeline"] * 1e3,
                      "sequential_ms": times["sequential"] * 1e3, "ratio": ratio, "bubble": bubble,
                      "textbook_bubble": sched.expected_bubble(), "ticks": sched.ticks,
                      "peak_stash": int(sched.peak_stash.max()), "temp_bytes": temp})
  print_table(f"GPT pipeline on {p} {jax.devices()[0].platform} devices vs sequential on 1, global batch 32",
              ["schedule", "m", "pipeline ms", "sequential ms", "ratio", "bubble (ran)",
               "(p-1)/(mv+p-1) (circular: if p | m)", "peak stash", "temp MiB/device"], rows)
  fixed = fixed_microbatch_memory(p, mesh, opt, [4, 16] if args.quick else [4, 16, 32])
  growth = weight_copy_check(p, mesh)
  write_json("pipeline", {"pipe": p, "results": records, "fixed_microbatch_memory": fixed,
                          "growth_per_microbatch": growth})
  _plot(records, fixed)


def fixed_microbatch_memory(p, mesh, opt, ms, rows_per_micro: int = 4):
  """Compiled temporary memory per device of every schedule with the micro-batch fixed and m growing."""
  rows, records = [], []
  for m in ms:
    temp = {}
    for schedule, layers, repeats in SCHEDULES:
      cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=layers, n_heads=4)
      stage_fn, loss_fn, input_fn, to_pipeline = gpt.pipeline_fns(cfg)
      params = to_pipeline(gpt.init(jax.random.key(0), cfg))
      batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), rows_per_micro * m, cfg))
      strategy = pipeline(stage_fn, loss_fn, opt, mesh, microbatches=m, schedule=schedule, repeats=repeats,
                          input_fn=input_fn)
      temp[schedule] = temp_bytes(strategy, strategy.init(params), strategy.shard_batch(batch))
    rows.append((m, rows_per_micro * m, *(temp[s] / MiB for s, _, _ in SCHEDULES), temp["gpipe"] / temp["1f1b"]))
    records.append({"microbatches": m, "batch": rows_per_micro * m,
                    **{f"{s}_temp_bytes": temp[s] for s, _, _ in SCHEDULES}})
  print_table(f"Temporary memory per device of the compiled step ({jax.devices()[0].platform}), GPT on p={p}, "
              f"micro-batch of {rows_per_micro} sequences",
              ["m", "global batch", "GPipe MiB", "circular (v=2) MiB", "1F1B MiB", "GPipe / 1F1B"], rows)
  return records


def weight_copy_check(p, mesh, width: int = 512, ms=(4, 32)):
  """Growth of the compiled temporary memory per micro-batch with one width x width layer per virtual stage
  and 1-row micro-batches: the activations (2 KiB each) against the weights (1 MiB per layer)."""
  stage_fn = lambda layer, x: x + jnp.tanh(x @ layer["w"] + layer["b"])
  loss_fn = lambda params, y, batch: jnp.mean((y - batch["y"]) ** 2)
  rows, records = [], []
  for schedule, _, repeats in SCHEDULES:
    layers = p * (repeats or 1)
    params = {"stages": {"w": jax.random.normal(jax.random.key(0), (layers, width, width)) / np.sqrt(width),
                         "b": jnp.zeros((layers, width))}}
    temp = {}
    for m in ms:
      strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule, repeats=repeats)
      batch = {"x": np.ones((m, width), np.float32), "y": np.ones((m, width), np.float32)}
      temp[m] = temp_bytes(strategy, strategy.init(params), strategy.shard_batch(batch))
    per_micro = (temp[ms[1]] - temp[ms[0]]) / (ms[1] - ms[0])
    weights = (repeats or 1) * (width * width + width) * 4
    rows.append((schedule, temp[ms[0]] / MiB, temp[ms[1]] / MiB, per_micro / MiB, per_micro / (width * 4),
                 per_micro / weights))
    records.append({"schedule": schedule, **{f"temp_bytes_m{m}": temp[m] for m in ms},
                    "growth_bytes_per_microbatch": per_micro, "stage_weight_bytes": weights})
  print_table(f"Growth per micro-batch, one {width}x{width} layer per virtual stage, 1-row micro-batches, p={p}",
              ["schedule", f"m={ms[0]} MiB", f"m={ms[1]} MiB", "growth MiB / micro-batch", "/ activation",
               "/ stage weights"], rows)
  return records


def _plot(records, fixed) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
  for schedule, _, _ in SCHEDULES:
    rs = [r for r in records if r["schedule"] == schedule]
    ms = [r["microbatches"] for r in rs]
    a.plot(ms, [r["ratio"] for r in rs], marker="o", label=schedule)
    b.plot(ms, [r["bubble"] for r in rs], marker="o", label=f"{schedule} (measured)")
    b.plot(ms, [r["textbook_bubble"] for r in rs], linestyle=":", label=f"{schedule} (textbook)")
    c.plot(ms, [r["temp_bytes"] / MiB for r in rs], marker="o", label=f"{schedule}, global batch 32")
  for schedule, _, _ in SCHEDULES:
    c.plot([r["microbatches"] for r in fixed], [r[f"{schedule}_temp_bytes"] / MiB for r in fixed], marker="s",
           linestyle="--", label=f"{schedule}, micro-batch 4")
  a.set_ylabel("pipeline step / sequential step")
  b.set_ylabel("bubble: idle stage-ticks / all")
  c.set_ylabel("compiled temp memory per device (MiB)")
  for ax in (a, b, c):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure(fig, "pipeline")


if __name__ == "__main__":
  main()
