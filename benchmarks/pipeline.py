"""Pipeline parallelism: step time against the sequential single-device step, and the bubble, as m grows.

The GPT (one block per stage) on p=4 pipe devices with GPipe and circular (v=2, 8 layers) schedules,
m in {1, 2, 4, 8, 16} micro-batches, the same global batch each time. Reported per m: the pipeline's
step time, the sequential step on one device (same batch, same run), their ratio, the bubble measured
from the schedule that ran and the textbook (p-1)/(m v+p-1). On emulated CPU devices the 4 stages share
2 cores, so the ratio shows the schedule's overhead, not a speed-up. Writes bench_results/pipeline.json
and bench_results/pipeline.png.

Run: python benchmarks/pipeline.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, setup_devices, time_interleaved, write_json  # noqa: E402

setup_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.pipeline import pipeline  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  p = 4
  ms = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
  steps, rounds = (2, 2) if args.quick else (5, 3)
  rows, records = [], []
  for schedule, layers, repeats in (("gpipe", 4, None), ("circular", 8, 2)):
    cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=layers, n_heads=4)
    stage_fn, loss_fn, input_fn, to_pipeline = gpt.pipeline_fns(cfg)
    params = gpt.init(jax.random.key(0), cfg)
    batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), 32, cfg))
    opt = optax.adam(1e-3)
    seq = jdist.data_parallel(gpt.loss_fn(cfg), opt, jdist.make_mesh(data=1, devices=jax.devices()[:1]))
    mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
    for m in ms:
      strategy = pipeline(stage_fn, loss_fn, opt, mesh, microbatches=m, schedule=schedule, repeats=repeats,
                          input_fn=input_fn)
      box = {"pipe": strategy.init(to_pipeline(params)), "seq": seq.init(params)}
      pb, sb = strategy.shard_batch(batch), seq.shard_batch(batch)
      out = {}

      def run_pipe():
        box["pipe"], out["pipe"] = strategy.step(box["pipe"], pb)
        return out["pipe"]["loss"]

      def run_seq():
        box["seq"], metrics = seq.step(box["seq"], sb)
        return metrics["loss"]

      times = time_interleaved({"pipeline": run_pipe, "sequential": run_seq}, steps=steps, rounds=rounds)
      sched = strategy.info["schedule"]
      bubble = float(out["pipe"]["bubble"])
      ratio = times["pipeline"] / times["sequential"]
      rows.append((schedule, m, times["pipeline"] * 1e3, times["sequential"] * 1e3, ratio, bubble,
                   sched.expected_bubble()))
      records.append({"schedule": schedule, "microbatches": m, "pipeline_ms": times["pipeline"] * 1e3,
                      "sequential_ms": times["sequential"] * 1e3, "ratio": ratio, "bubble": bubble,
                      "textbook_bubble": sched.expected_bubble(), "ticks": sched.ticks})
  print_table(f"GPT pipeline on {p} {jax.devices()[0].platform} devices vs sequential on 1, global batch 32",
              ["schedule", "m", "pipeline ms", "sequential ms", "ratio", "bubble (ran)", "(p-1)/(mv+p-1)"], rows)
  write_json("pipeline", {"pipe": p, "results": records})
  _plot(records)


def _plot(records) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  for schedule in ("gpipe", "circular"):
    rs = [r for r in records if r["schedule"] == schedule]
    ms = [r["microbatches"] for r in rs]
    a.plot(ms, [r["ratio"] for r in rs], marker="o", label=schedule)
    b.plot(ms, [r["bubble"] for r in rs], marker="o", label=f"{schedule} (measured)")
    b.plot(ms, [r["textbook_bubble"] for r in rs], linestyle=":", label=f"{schedule} (textbook)")
  a.set_ylabel("pipeline step / sequential step")
  b.set_ylabel("bubble: idle stage-ticks / all")
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out = pathlib.Path("bench_results") / "pipeline.png"
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
