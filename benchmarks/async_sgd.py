"""The async SGD emulator's throughput against data_parallel, same model, same examples, same run.

Throughput is counted in per-device gradients per second, the same unit for both: one *gradient* is the
gradient of one mini-batch of b examples. A data_parallel step on N devices with a global batch of
N*b computes N of them (one per device); an emulator tick with N workers of b examples each computes
N of them (one per worker, whether or not the schedule delivers it). So

  async worker-gradients / s = N / tick time,   data_parallel gradients / s = N / step time,

and their ratio is data_parallel step time / tick time (goal: >= 0.8). Timing is interleaved
(benchmarks/_common.time_interleaved). Emulator rows: every worker delivering every tick (each tick
one synchronous round), half the workers pausing (the delivered gradients applied one by one, as a
parameter server does), and the same on one device with the workers vmapped instead of one per device
(the layout examples/async_sgd.py uses on a CPU). The rows with no pauses run ``apply="mean"`` (one averaged
update a tick), those with pauses ``apply="each"`` (every delivered gradient its own update, the most work a
tick). Every row has two ratios: to data_parallel on all the devices, and to data_parallel on the devices the
row uses. They differ for the one-device row: there
the emulator takes 8 gradients at 8 different copies of the weights on one device, where
data_parallel on that device takes one gradient of the whole batch at one copy. Writes bench_results/async_sgd.json.

Run: python benchmarks/async_sgd.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, setup_devices, time_interleaved, write_json  # noqa: E402

setup_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
from jdist.models import gpt, mlp  # noqa: E402
from jdist.strategies.async_sgd import async_sgd, split_workers  # noqa: E402


def models(quick: bool, n: int):
  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  per = 32
  batch = {"x": rng.normal(size=(n * per, 256)).astype(np.float32), "y": rng.integers(0, 10, n * per).astype(np.int32)}
  yield "MLP", per, mlp.init(key, [256, 1024, 512, 256, 10]), mlp.loss, batch
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64 if quick else 128, d_model=128, n_layers=2, n_heads=4)
  yield "GPT", 2, gpt.init(key, cfg), gpt.loss_fn(cfg), jax.device_get(gpt.synthetic_tokens(key, 2 * n, cfg))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  steps, rounds = (5, 3) if args.quick else (20, 7)
  devices = jax.devices()
  n = len(devices)
  dp_meshes = {n: jdist.make_mesh(data=n, devices=devices), 1: jdist.make_mesh(data=1, devices=devices[:1])}
  workers_mesh = jdist.make_mesh(workers=n, devices=devices)
  rows, results = [], {}
  for name, per, params, loss_fn, host_batch in models(args.quick, n):
    optimizer = optax.adam(1e-3)
    fns, box, baselines = {}, {}, {}
    for d, dp_mesh in dp_meshes.items():
      label = f"data_parallel, {d} device{'s' if d > 1 else ''}"
      dp = jdist.data_parallel(loss_fn, optimizer, dp_mesh)
      box[label] = dp.init(params)
      dp_batch = dp.shard_batch(host_batch)

      def run_dp(label=label, dp=dp, dp_batch=dp_batch):
        box[label], m = dp.step(box[label], dp_batch)
        return m["loss"]

      fns[label] = run_dp
      baselines[d] = label
    variants = {  # label: (the devices it runs on, the mesh, async_sgd options)
        f"async, {n} devices, no pauses": (n, workers_mesh, dict(apply="mean")),
        f"async, {n} devices, pause 0.5": (n, workers_mesh, dict(pause_prob=0.5, apply="each")),
        "async, 1 device (vmap), pause 0.5": (1, None, dict(pause_prob=0.5, apply="each")),
    }
    for label, (_, mesh, kw) in variants.items():
      strategy = async_sgd(loss_fn, optimizer, mesh, num_workers=n, **kw)
      box[label] = strategy.init(params)
      batch = strategy.shard_batch(split_workers(host_batch, n))

      def run_async(label=label, strategy=strategy, batch=batch):
        box[label], m = strategy.step(box[label], batch)
        return m["loss"]

      fns[label] = run_async
    times = time_interleaved(fns, steps=steps, rounds=rounds)
    rate = {label: n / t for label, t in times.items()}  # per-device (per-worker) gradients per second
    results[name] = {"per_worker_batch": per, "async": {}}
    for d, label in baselines.items():
      results[name][label] = {"step_ms": times[label] * 1e3, "grads_per_s": rate[label]}
      rows.append((name, label, times[label] * 1e3, rate[label], "", ""))
    for label, (d, _, _) in variants.items():
      to_all, to_same = rate[label] / rate[baselines[n]], rate[label] / rate[baselines[d]]
      rows.append((name, label, times[label] * 1e3, rate[label], to_all, to_same))
      results[name]["async"][label] = {"tick_ms": times[label] * 1e3, "worker_grads_per_s": rate[label],
                                       "ratio_to_all_devices": to_all, "ratio_to_same_devices": to_same}
  print_table(f"async_sgd emulator vs data_parallel, {n} {devices[0].platform} devices, Adam "
              f"(median of {rounds} interleaved rounds x {steps} steps)",
              ["model", "strategy", "ms per step/tick", "gradients / s", f"ratio to DP on {n} devices",
               "ratio to DP on its devices"], rows)
  write_json("async_sgd", {"devices": n, "platform": devices[0].platform, "device_kind": devices[0].device_kind,
                           "unit": "per-device (per-worker) mini-batch gradients per second", "results": results})


if __name__ == "__main__":
  main()
