"""What ``jdist.fit`` costs over a hand-written loop: the same strategy step, the same data, one device.

Three loops drive one compiled ``data_parallel`` step on a 1-device mesh (its dispatch is asynchronous,
as on a GPU) over the same ``ArrayLoader``:

- hand-written: ``state, metrics = step(state, batch)``, reading the loss every ``log_every`` steps;
- ``fit(overlap=True)`` (the default): logs, a NanGuard, metrics read one step late;
- ``fit(overlap=False)``: the same, but every step's metrics read before the next step starts.

Prints steps/s of each (median of interleaved rounds) and the ratio to the hand-written loop (goal for
the default: >= 0.95). Writes bench_results/fit_loop.json.

Run: python benchmarks/fit_loop.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import print_table, write_json  # noqa: E402

import jdist  # noqa: E402
from jdist.data import ArrayLoader  # noqa: E402
from jdist.models import mlp  # noqa: E402
from jdist.train import NanGuard, fit  # noqa: E402

LOG_EVERY = 10


def make(sizes, batch_size):
  mesh = jdist.make_mesh(data=1, devices=jax.devices()[:1])
  strategy = jdist.data_parallel(mlp.loss, optax.adam(1e-3), mesh)
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(batch_size * 32, sizes[0])).astype(np.float32),
          "y": rng.integers(0, sizes[-1], batch_size * 32).astype(np.int32)}
  params = mlp.init(jax.random.key(0), sizes)
  return strategy, params, data


def hand_written(strategy, params, data, batch_size, steps):
  state = strategy.init(params)
  loader = ArrayLoader(data, batch_size, seed=0)
  t = time.perf_counter()
  for i, batch in zip(range(steps), loader):
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    if (i + 1) % LOG_EVERY == 0:
      float(metrics["loss"])
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - t)


def through_fit(strategy, params, data, batch_size, steps, overlap, run_dir):
  state = strategy.init(params)
  loader = ArrayLoader(data, batch_size, seed=0)
  t = time.perf_counter()
  result = fit(strategy, state, loader, steps=steps, callbacks=[NanGuard()], log_every=LOG_EVERY,
               run_dir=run_dir, tensorboard=False, overlap=overlap)
  jax.block_until_ready(result.state)
  return steps / (time.perf_counter() - t)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  steps, rounds = (100, 3) if args.quick else (300, 7)
  configs = {"MLP 64-256-10, batch 128": ([64, 256, 10], 128),
             "MLP 256-1024-1024-10, batch 512": ([256, 1024, 1024, 10], 512)}
  rows, results = [], {"device": str(jax.devices()[0]), "steps": steps, "rounds": rounds}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (sizes, batch_size) in configs.items():
      strategy, params, data = make(sizes, batch_size)
      loops = {
          "hand-written": lambda: hand_written(strategy, params, data, batch_size, steps),
          "fit overlap": lambda: through_fit(strategy, params, data, batch_size, steps, True, f"{tmp}/a"),
          "fit no overlap": lambda: through_fit(strategy, params, data, batch_size, steps, False, f"{tmp}/b"),
      }
      for loop in loops.values():  # compile and warm up
        loop()
      samples = {k: [] for k in loops}
      for _ in range(rounds):
        for k, loop in loops.items():
          samples[k].append(loop())
      rate = {k: statistics.median(v) for k, v in samples.items()}
      base = rate["hand-written"]
      rows.append((name, base, rate["fit overlap"], rate["fit no overlap"], rate["fit overlap"] / base,
                   rate["fit no overlap"] / base))
      results[name] = {"steps_per_s": rate, "ratio_overlap": rate["fit overlap"] / base,
                       "ratio_no_overlap": rate["fit no overlap"] / base}
  print_table(f"jdist.fit vs a hand-written loop, 1 device ({jax.devices()[0].platform}), {steps} steps, "
              f"median of {rounds}",
              ["model", "hand steps/s", "fit steps/s", "fit no-overlap steps/s", "fit / hand (goal >= 0.95)",
               "no-overlap / hand"], rows)
  write_json("fit_loop", results)


if __name__ == "__main__":
  main()
