"""jdist.data_parallel against the step a user writes by hand (jax.jit + NamedSharding), same mesh, same run.

Prints, per model, the median step time of each and their ratio (goal: jdist / hand-written <= 1.05),
plus the bytes each device sends per step from the compiled HLO against the ring AllReduce figure
2(N-1)/N x gradient bytes. Writes bench_results/data_parallel.json.

Run: python benchmarks/data_parallel.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, setup_devices, time_against_hand, write_json  # noqa: E402

setup_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jdist  # noqa: E402
from jdist.models import gpt, mlp  # noqa: E402


def hand_written_step(loss_fn, optimizer, mesh):
  """What a user writes without jdist: GSPMD replicates params and splits the batch."""
  rep = NamedSharding(mesh, P())

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(rep, rep, rep))


def models(quick: bool):
  key = jax.random.key(0)
  sizes = [256, 1024, 512, 256, 10]
  rng = np.random.default_rng(0)
  mlp_batch = {"x": rng.normal(size=(256, 256)).astype(np.float32), "y": rng.integers(0, 10, 256).astype(np.int32)}
  yield "MLP", mlp.init(key, sizes), mlp.loss, mlp_batch
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64 if quick else 128, d_model=128, n_layers=2, n_heads=4)
  yield "GPT", gpt.init(key, cfg), gpt.loss_fn(cfg), jax.device_get(gpt.synthetic_tokens(key, 16, cfg))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  steps, rounds = (5, 3) if args.quick else (20, 7)
  devices = jax.devices()
  mesh = jdist.make_mesh(data=len(devices), devices=devices)
  n = mesh.size
  rows, results = [], {}
  for name, params, loss_fn, host_batch in models(args.quick):
    optimizer = optax.adam(1e-3)
    strategy = jdist.data_parallel(loss_fn, optimizer, mesh)
    state = strategy.init(params)
    batch = strategy.shard_batch(host_batch)
    hand = hand_written_step(loss_fn, optimizer, mesh)
    h_params = jdist.replicate(params, mesh)
    h_opt = jax.jit(optimizer.init, out_shardings=NamedSharding(mesh, P()))(h_params)
    times, state, hand_state = time_against_hand(strategy, state, hand, (h_params, h_opt), batch, steps=steps,
                                                 rounds=rounds)
    grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    ours = jdist.comm_report(strategy.step.lower(state, batch)).total_sent_bytes
    theirs = jdist.comm_report(hand.lower(*hand_state, batch)).total_sent_bytes
    ideal = 2 * (n - 1) / n * grad_bytes
    ratio = times["jdist"] / times["hand"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rows.append((name, f"{n_params / 1e6:.2f}M", times["jdist"] * 1e3, times["hand"] * 1e3, ratio,
                 ours / ideal, theirs / ideal))
    results[name] = {"params": int(n_params), "jdist_step_ms": times["jdist"] * 1e3,
                     "hand_step_ms": times["hand"] * 1e3, "ratio": ratio, "jdist_sent_bytes": ours,
                     "hand_sent_bytes": theirs, "ring_ideal_bytes": ideal}
  print_table(f"data_parallel vs hand-written jit + NamedSharding, {n} {devices[0].platform} devices "
              f"(median of {rounds} interleaved rounds x {steps} steps)",
              ["model", "params", "jdist ms", "hand ms", "ratio (goal <= 1.05)", "jdist bytes / ring ideal",
               "hand bytes / ring ideal"], rows)
  write_json("data_parallel", {"devices": n, "platform": devices[0].platform, "device_kind": devices[0].device_kind,
                               "results": results})


if __name__ == "__main__":
  main()
