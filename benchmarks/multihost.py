"""2 processes x 4 devices against 1 process x 8 devices, every strategy: the same model, mesh size and global batch.

Each configuration runs in fresh processes (``jdist launch`` for the two-process one), alternating over
``--rounds`` so that drift hits both alike; each process times its steps after a warm-up and process 0
reports the median. On one machine the difference is what gloo over loopback costs against XLA's
in-process collectives, plus two processes competing for the same cores: it says nothing about a
network between real hosts. Writes bench_results/multihost.json.

Run: python benchmarks/multihost.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def workloads(quick: bool):
  """``(model, strategy name, params, global batch, make(batch) -> (strategy, this process's batch))`` for every
  strategy: the same model and global batch in every process layout. Imported in the worker only (after
  ``jdist.distributed.initialize``)."""
  import jax
  import numpy as np
  import optax

  import jdist
  from jdist.models import gpt, mlp, resmlp
  from jdist.strategies.async_sgd import split_workers

  key, rng = jax.random.key(0), np.random.default_rng(0)
  p, count = jax.process_index(), jax.process_count()

  def share(batch):  # this process's rows of the global batch (jdist.batches.put_batch's convention)
    return jax.tree.map(lambda x: x[p * len(x) // count:(p + 1) * len(x) // count], batch)

  mlp_batch = {"x": rng.normal(size=(256, 256)).astype(np.float32), "y": rng.integers(0, 10, 256).astype(np.int32)}
  mlp_params = mlp.init(key, [256, 1024, 512, 256, 10])
  res_params = resmlp.init(key, 256, 256, 8, 10)
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64 if quick else 128, d_model=128, n_layers=2, n_heads=4)
  gpt_batch = jax.device_get(gpt.synthetic_tokens(key, 16, cfg))
  adam = optax.adam(1e-3)
  stage, head_loss, embed = resmlp.pipeline_fns()

  def plain(make):  # strategies whose shard_batch takes this process's rows as they are
    return lambda batch: (make(), share(batch))

  def pipe(schedule, data_axis=None, **axes):
    return plain(lambda: jdist.pipeline(stage, head_loss, adam, jdist.make_mesh(**axes), microbatches=4,
                                        schedule=schedule, data_axis=data_axis, input_fn=embed))

  n_workers = 8
  return [
      ("MLP", "data_parallel", mlp_params, mlp_batch, plain(lambda: jdist.data_parallel(
          mlp.loss, adam, jdist.make_mesh(data=-1)))),
      ("MLP", "data_parallel pmap", mlp_params, mlp_batch, plain(lambda: jdist.data_parallel(
          mlp.loss, adam, jdist.make_mesh(data=-1), backend="pmap"))),
      ("MLP", "sharded fsdp", mlp_params, mlp_batch, plain(lambda: jdist.sharded(
          mlp.loss, adam, jdist.make_mesh(fsdp=-1), fsdp_axis="fsdp"))),
      ("MLP", "fsdp (shard_map)", mlp_params, mlp_batch, plain(lambda: jdist.model_parallel.fsdp(
          mlp.loss, adam, jdist.make_mesh(fsdp=-1)))),
      ("MLP", "local_sgd H=4", mlp_params, mlp_batch, plain(lambda: jdist.local_sgd(
          mlp.loss, adam, jdist.make_mesh(data=-1), sync_every=4))),
      ("MLP", "diloco H=4", mlp_params, mlp_batch, plain(lambda: jdist.local_sgd(
          mlp.loss, adam, jdist.make_mesh(data=-1), sync_every=4,
          outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True)))),
      ("MLP", "async_sgd 8 workers", mlp_params, mlp_batch, lambda batch: (jdist.async_sgd(
          mlp.loss, adam, jdist.make_mesh(workers=-1), num_workers=n_workers), split_workers(share(batch), n_workers))),
      ("ResMLP", "pipeline gpipe data=2 x pipe=4", res_params, mlp_batch, pipe("gpipe", "data", data=2, pipe=4)),
      ("ResMLP", "pipeline gpipe pipe=8", res_params, mlp_batch, pipe("gpipe", pipe=8)),
      ("ResMLP", "pipeline 1f1b pipe=4 x data=2", res_params, mlp_batch, pipe("1f1b", "data", pipe=4, data=2)),
      ("GPT", "data_parallel", gpt.init(key, cfg), gpt_batch, plain(lambda: jdist.data_parallel(
          gpt.loss_fn(cfg), adam, jdist.make_mesh(data=-1)))),
  ]


def time_steps(strategy, params, batch, steps: int, repeats: int) -> tuple[float, float]:
  """Median seconds per step over ``repeats`` runs of ``steps`` steps (after 3 to compile and warm up), and the
  last loss."""
  import jax

  state = strategy.init(params)
  placed = strategy.shard_batch(batch)
  for _ in range(3):
    state, metrics = strategy.step(state, placed)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = strategy.step(state, placed)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times), float(metrics["loss"])


def worker(out: str, steps: int, repeats: int, quick: bool) -> None:
  """One process of a configuration: times each workload, process 0 writes ``out`` (JSON). A strategy that
  refuses this layout (pmap across processes) is recorded with its error instead of a time."""
  import jdist.distributed

  jdist.distributed.initialize(local_device_count=int(os.environ.get("JDIST_LOCAL_DEVICES", "8")))
  import jax

  results = {}
  for model, name, params, batch, make in workloads(quick):
    entry = {"params": int(sum(x.size for x in jax.tree.leaves(params)))}
    try:
      strategy, local = make(batch)
    except ValueError as e:  # refused at construction, the same in every process
      entry["refused"] = f"{type(e).__name__}: {str(e).split('. ')[0]}"
    else:
      entry["step_s"], entry["loss"] = time_steps(strategy, params, local, steps, repeats)
    results[f"{model} {name}"] = entry
  if jax.process_index() == 0:
    pathlib.Path(out).write_text(json.dumps({"processes": jax.process_count(), "devices": len(jax.devices()),
                                             "platform": jax.devices()[0].platform, "results": results}))


def run_config(processes: int, devices: int, args, tmp: pathlib.Path) -> dict:
  out = tmp / f"{processes}x{devices}-{time.monotonic_ns()}.json"
  work = [sys.executable, __file__, "--worker", str(out), "--steps", str(args.steps), "--repeats", str(args.repeats)]
  work += ["--quick"] if args.quick else []
  if processes == 1:
    cmd, env = work, {k: v for k, v in os.environ.items() if not k.startswith("JDIST_")}
  else:
    cmd = [sys.executable, "-m", "jdist.cli", "launch", "-n", str(processes), "--devices-per-process", str(devices),
           "--", *work]
    env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env.setdefault("JAX_PLATFORMS", "cpu")
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
  if done.returncode != 0 or not out.exists():
    tail = [line for line in (done.stdout + done.stderr).splitlines() if "Gloo] Rank" not in line][-30:]
    raise SystemExit(f"{processes} x {devices} run failed ({done.returncode}):\n" + "\n".join(tail))
  return json.loads(out.read_text())


def summarize(samples: dict[str, list[dict]]) -> tuple[list[tuple], dict]:
  """The table's rows and the JSON results: median step times of each layout, their ratio, the loss difference."""
  rows, results = [], {}
  for workload, first in samples["1x8"][0]["results"].items():
    two_first = samples["2x4"][0]["results"][workload]
    size = f"{first['params'] / 1e6:.2f}M"
    if "refused" in two_first or "refused" in first:
      one = statistics.median(s["results"][workload]["step_s"] for s in samples["1x8"]) if "step_s" in first else None
      rows.append((workload, size, one * 1e3 if one else "-", "refused", "-", "-"))
      results[workload] = {"params": first["params"], "step_ms_1x8": one * 1e3 if one else None,
                           "refused_2x4": two_first.get("refused"), "refused_1x8": first.get("refused")}
      continue
    one = statistics.median(s["results"][workload]["step_s"] for s in samples["1x8"])
    two = statistics.median(s["results"][workload]["step_s"] for s in samples["2x4"])
    rows.append((workload, size, one * 1e3, two * 1e3, two / one, f"{abs(two_first['loss'] - first['loss']):.1e}"))
    results[workload] = {"params": first["params"], "step_ms_1x8": one * 1e3, "step_ms_2x4": two * 1e3,
                         "ratio": two / one, "final_loss_1x8": first["loss"], "final_loss_2x4": two_first["loss"]}
  return rows, results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of both configurations")
  args = parser.parse_args()
  args.steps = args.steps or (5 if args.quick else 10)
  args.repeats = args.repeats or (3 if args.quick else 5)
  rounds = args.rounds or (1 if args.quick else 2)
  if args.worker:
    worker(args.worker, args.steps, args.repeats, args.quick)
    return
  from _common import print_table, write_json

  configs = {"1x8": (1, 8), "2x4": (2, 4)}
  samples: dict[str, list[dict]] = {k: [] for k in configs}
  with tempfile.TemporaryDirectory() as tmp:
    for _ in range(rounds):
      for name, (processes, devices) in configs.items():
        samples[name].append(run_config(processes, devices, args, pathlib.Path(tmp)))
  rows, results = summarize(samples)
  platform = samples["1x8"][0]["platform"]
  print_table(f"2 processes x 4 devices (gloo over loopback) vs 1 process x 8 devices, {platform}, one machine "
              f"(median of {rounds} round(s) x {args.repeats} repeats x {args.steps} steps)",
              ["workload", "params", "1x8 ms", "2x4 ms", "2x4 / 1x8", "|loss diff|"], rows)
  print("On one machine this is the cost of gloo over loopback and of two processes sharing the cores, "
        "not of a network between hosts.")
  write_json("multihost", {"platform": platform, "cpu_count": os.cpu_count(), "rounds": rounds, "steps": args.steps,
                           "repeats": args.repeats, "results": results})


if __name__ == "__main__":
  main()
