"""Pipeline schedules: compiled memory per device, FLOPs and modelled step time against m, for every
schedule and remat choice.

The GPT (d=128, seq 64, 8 blocks) on p=4 pipe devices, micro-batches of 4 sequences, m in {4, 8, 16, 32}
(the global batch grows with m, as a pipeline that feeds more micro-batches to shrink the bubble does).
For each schedule ("gpipe", "circular" v=2, "1f1b", "interleaved_1f1b" v=2, "zb_h1", "zb_h1" v=2, "zbv")
and remat (None: residuals stashed; "nothing_saveable": the stage input only, the forward run again;
"dots_saveable" for 1F1B) it reports:

- XLA's temporary memory per device of the compiled step (``memory_analysis().temp_size_in_bytes``:
  activations or residuals kept for the backward, the inboxes, gradient sums);
- the FLOPs of one op (F, B, W of a virtual stage; for GPipe a tick's forward and backward), each compiled
  alone (``op_flops``: the whole step's cost analysis counts a loop body once and a switch's costliest
  branch), and the step's FLOPs per device (``step_flops``: GPipe also computes on idle ticks);
- the step time modelled from the table with those FLOPs as op durations (``modelled_time``): lockstep,
  as jdist runs it (every device on the same tick; a tick lasts its costliest op), and asynchronous (each
  device starts an op as soon as its inputs exist: the papers' and torch's model), both relative to the
  work of one device without bubble or recomputation, m (F + B) of GPipe's ops;
- the bytes each device sends per step (``comm_report``: the ppermutes).

A last table checks that memory grows by activations, not weights: one 512 x 512 layer per virtual stage,
1-row micro-batches, growth per micro-batch from m=4 to m=32 (issue 18). On emulated CPU devices wall time
says nothing about a pipeline (the devices share the cores), so none is measured. Writes
bench_results/pipeline.json and bench_results/pipeline.png.

Run: python benchmarks/pipeline.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, save_figure, setup_devices, write_json  # noqa: E402

setup_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
from jdist.analysis import comm_report  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.strategies.pipeline import modelled_time, op_flops, pipeline  # noqa: E402

# (label, schedule, repeats, remat)
RUNS = (("gpipe", "gpipe", None, None), ("gpipe nothing", "gpipe", None, "nothing_saveable"),
        ("circular v=2", "circular", 2, None), ("1f1b", "1f1b", None, None),
        ("1f1b nothing", "1f1b", None, "nothing_saveable"), ("1f1b dots", "1f1b", None, "dots_saveable"),
        ("interleaved v=2", "interleaved_1f1b", 2, None), ("interleaved v=2 nothing", "interleaved_1f1b", 2,
                                                            "nothing_saveable"),
        ("zb_h1", "zb_h1", None, None), ("zb_h1 nothing", "zb_h1", None, "nothing_saveable"),
        ("zb_h1 v=2", "zb_h1", 2, None), ("zbv", "zbv", None, None), ("zbv nothing", "zbv", None, "nothing_saveable"))
MiB = 2**20


def measure(label, schedule, repeats, remat, m, p, mesh, costs, rows_per_micro=4):
  """One schedule / remat at m micro-batches; ``costs`` caches each label's op FLOPs (they do not depend on m)."""
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=8, n_heads=4)
  stage_fn, loss_fn, input_fn, to_pipeline = gpt.pipeline_fns(cfg)
  params = to_pipeline(gpt.init(jax.random.key(0), cfg))
  batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), rows_per_micro * m, cfg))
  strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-3), mesh, microbatches=m, schedule=schedule, repeats=repeats,
                      input_fn=input_fn, remat=remat)
  state, batch = strategy.init(params), strategy.shard_batch(batch)
  compiled = strategy.step.lower(state, batch).compile()
  sched = strategy.info["schedule"]
  if label not in costs:
    costs[label] = op_flops(strategy, jax.eval_shape(lambda: state), batch)
  cost = costs[label]
  steps = np.array([sum(cost[str(o)] for o in sched.op[:, d] if o != ".") for d in range(p)]) if sched.op is not None \
      else np.full(p, sched.ticks * (cost["F"] + cost["B"]))
  return {"label": label, "schedule": schedule, "repeats": sched.repeats, "remat": remat, "microbatches": m,
          "ticks": sched.ticks, "bubble": sched.bubble, "peak_stash": sched.peak_stash.tolist(),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes, "op_flops": cost,
          "step_flops": float(steps.max()), "lockstep": modelled_time(sched, cost),
          "async": modelled_time(sched, cost, lockstep=False),
          "sent_bytes": comm_report(compiled)["collective-permute"].sent_bytes}


def weight_copy_check(p, mesh, width: int = 512, ms=(4, 32)):
  """Growth of the compiled temporary memory per micro-batch with one width x width layer per virtual stage
  and 1-row micro-batches: the activations (2 KiB each) against the weights (1 MiB per layer)."""
  stage_fn = lambda layer, x: x + jnp.tanh(x @ layer["w"] + layer["b"])
  loss_fn = lambda params, y, batch: jnp.mean((y - batch["y"]) ** 2)
  rows, records = [], []
  for schedule, repeats in (("gpipe", None), ("circular", 2), ("1f1b", None), ("interleaved_1f1b", 2), ("zb_h1", None),
                            ("zbv", None)):
    v = repeats or (2 if schedule == "zbv" else 1)
    params = {"stages": {"w": jax.random.normal(jax.random.key(0), (p * v, width, width)) / np.sqrt(width),
                         "b": jnp.zeros((p * v, width))}}
    temp = {}
    for m in ms:
      strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule, repeats=repeats)
      batch = {"x": np.ones((m, width), np.float32), "y": np.ones((m, width), np.float32)}
      temp[m] = strategy.step.lower(strategy.init(params), strategy.shard_batch(batch)).compile(
      ).memory_analysis().temp_size_in_bytes
    per_micro = (temp[ms[1]] - temp[ms[0]]) / (ms[1] - ms[0])
    weights = v * (width * width + width) * 4
    rows.append((schedule, temp[ms[0]] / MiB, temp[ms[1]] / MiB, per_micro / MiB, per_micro / (width * 4),
                 per_micro / weights))
    records.append({"schedule": schedule, **{f"temp_bytes_m{m}": temp[m] for m in ms},
                    "growth_bytes_per_microbatch": per_micro, "stage_weight_bytes": weights})
  print_table(f"Growth per micro-batch, one {width}x{width} layer per virtual stage, 1-row micro-batches, p={p}",
              ["schedule", f"m={ms[0]} MiB", f"m={ms[1]} MiB", "growth MiB / micro-batch", "/ activation",
               "/ stage weights"], rows)
  return records


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="m in {4, 8}, fewer runs")
  args = parser.parse_args()
  p = 4
  ms = [4, 8] if args.quick else [4, 8, 16, 32]
  runs = [r for r in RUNS if not args.quick or r[3] is None]
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  costs = {}
  records = [measure(*run, m, p, mesh, costs) for run in runs for m in ms]
  ideal = {m: m * sum(r["op_flops"].values()) for r in records if r["label"] == "gpipe" for m in [r["microbatches"]]}
  rows = [(r["label"], r["microbatches"], r["ticks"], f"{r['bubble']:.3f}", " ".join(map(str, r["peak_stash"])),
           r["temp_bytes"] / MiB, " ".join(f"{k} {v / 1e6:.0f}" for k, v in r["op_flops"].items()),
           r["step_flops"] / ideal[r["microbatches"]], r["lockstep"] / ideal[r["microbatches"]],
           r["async"] / ideal[r["microbatches"]], r["sent_bytes"] / MiB) for r in records]
  print_table(f"GPT (8 blocks, d=128) on p={p} {jax.devices()[0].platform} devices, micro-batch of 4 sequences",
              ["schedule / remat", "m", "ticks", "bubble", "peak stash", "temp MiB/device", "MFLOP per op",
               "step FLOPs / ideal", "lockstep time / ideal", "async time / ideal", "sent MiB/device"], rows)
  growth = weight_copy_check(p, mesh, ms=(4, 16) if args.quick else (4, 32))
  for r in records:
    r["ideal_flops"] = ideal[r["microbatches"]]
  write_json("pipeline", {"pipe": p, "results": records, "growth_per_microbatch": growth})
  _plot(records, ideal)


def _plot(records, ideal) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(17, 5))
  labels = list(dict.fromkeys(r["label"] for r in records))
  colors = dict(zip(dict.fromkeys(r["schedule"] for r in records), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for label in labels:
    rs = [r for r in records if r["label"] == label]
    ms = [r["microbatches"] for r in rs]
    dash = {"nothing_saveable": "--", "dots_saveable": "-."}.get(rs[0]["remat"], "-")
    style = dict(color=colors[rs[0]["schedule"]], marker="o", label=label,
                 linestyle=":" if rs[0]["repeats"] > 1 and rs[0]["schedule"] == "zb_h1" else dash)
    axes[0].plot(ms, [r["temp_bytes"] / MiB for r in rs], **style)
    axes[1].plot(ms, [r["lockstep"] / ideal[r["microbatches"]] for r in rs], **style)
    axes[2].plot(ms, [r["async"] / ideal[r["microbatches"]] for r in rs], **style)
  axes[0].set_ylabel("compiled temp memory per device (MiB)")
  axes[1].set_ylabel("modelled step time, lockstep (jdist) / ideal")
  axes[2].set_ylabel("modelled step time, asynchronous / ideal")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m (micro-batch of 4 sequences)")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[2].legend(fontsize=7, ncol=2)
  fig.suptitle("GPT on 4 pipe devices: memory and modelled time per schedule (dashed: remat nothing_saveable, "
               "dash-dot: dots_saveable, dotted: zb_h1 v=2); ideal = m (F + B) of one device, no bubble, no "
               "recomputation", fontsize=10)
  fig.tight_layout()
  save_figure(fig, "pipeline")


if __name__ == "__main__":
  main()
