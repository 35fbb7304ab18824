"""2 processes x 4 devices against 1 process x 8 devices: the same model, mesh size and global batch.

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


def worker(out: str, steps: int, repeats: int, quick: bool) -> None:
  """One process of a configuration: times each workload, process 0 writes ``out`` (JSON)."""
  import jdist.distributed

  jdist.distributed.initialize(local_device_count=int(os.environ.get("JDIST_LOCAL_DEVICES", "8")))
  import jax
  import numpy as np
  import optax

  import jdist
  from jdist.models import gpt, mlp

  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  p, count = jax.process_index(), jax.process_count()

  def share(batch):  # this process's rows of the global batch (jdist.batches.put_batch's convention)
    return jax.tree.map(lambda x: x[p * len(x) // count:(p + 1) * len(x) // count], batch)

  mlp_sizes = [256, 1024, 512, 256, 10]
  mlp_batch = {"x": rng.normal(size=(256, 256)).astype(np.float32), "y": rng.integers(0, 10, 256).astype(np.int32)}
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64 if quick else 128, d_model=128, n_layers=2, n_heads=4)
  gpt_batch = jax.device_get(gpt.synthetic_tokens(key, 16, cfg))
  workloads = [
      ("MLP", "data_parallel", mlp.init(key, mlp_sizes), mlp.loss, mlp_batch,
       lambda loss: jdist.data_parallel(loss, optax.adam(1e-3), jdist.make_mesh(data=-1))),
      ("MLP", "sharded fsdp", mlp.init(key, mlp_sizes), mlp.loss, mlp_batch,
       lambda loss: jdist.sharded(loss, optax.adam(1e-3), jdist.make_mesh(fsdp=-1), fsdp_axis="fsdp")),
      ("GPT", "data_parallel", gpt.init(key, cfg), gpt.loss_fn(cfg), gpt_batch,
       lambda loss: jdist.data_parallel(loss, optax.adam(1e-3), jdist.make_mesh(data=-1))),
  ]
  results = {}
  for model, name, params, loss_fn, batch, make in workloads:
    strategy = make(loss_fn)
    state = strategy.init(params)
    sharded = strategy.shard_batch(share(batch))
    for _ in range(3):  # compile and warm up
      state, metrics = strategy.step(state, sharded)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = strategy.step(state, sharded)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / steps)
    results[f"{model} {name}"] = {"step_s": statistics.median(times), "params": int(sum(
        x.size for x in jax.tree.leaves(params))), "loss": float(metrics["loss"])}
  if p == 0:
    pathlib.Path(out).write_text(json.dumps({"processes": count, "devices": len(jax.devices()),
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
  rows, results = [], {}
  for workload in samples["1x8"][0]["results"]:
    one = statistics.median(s["results"][workload]["step_s"] for s in samples["1x8"])
    two = statistics.median(s["results"][workload]["step_s"] for s in samples["2x4"])
    loss_1 = samples["1x8"][0]["results"][workload]["loss"]
    loss_2 = samples["2x4"][0]["results"][workload]["loss"]
    n_params = samples["1x8"][0]["results"][workload]["params"]
    rows.append((workload, f"{n_params / 1e6:.2f}M", one * 1e3, two * 1e3, two / one, f"{abs(loss_2 - loss_1):.1e}"))
    results[workload] = {"params": n_params, "step_ms_1x8": one * 1e3, "step_ms_2x4": two * 1e3, "ratio": two / one,
                         "final_loss_1x8": loss_1, "final_loss_2x4": loss_2}
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
