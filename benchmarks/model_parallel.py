"""Model parallelism on 8 devices: jdist.sharded against a hand-written jax.jit with the same shardings.

For each mesh (data=8; fsdp=8; model=8; data=2 x model=4; data=2 x fsdp=2 x model=2) and the GPT:
- step time of jdist vs a hand-written jit + NamedSharding step with the same parameter shardings
  (goal: ratio <= 1.05), measured in interleaved rounds in this one run;
- per-device bytes of parameters + optimizer state, from the shard shapes of the placed state, against
  the ideal (replicated bytes / devices that shard them); "args KB" is compiled.memory_analysis()'s
  argument size (the batch included);
- collective bytes per device per step from the compiled HLO against the textbook figure
  (DP 2(N-1)/N P; ZeRO-3 3(N-1)/N P; TP 4 all-reduces of B x S x D per block). On the mixed meshes
  the textbook figure is the tensor-parallel part only; their data-parallel and FSDP traffic is sent
  too, so "KB sent/dev" exceeds it.
Also the explicit shard_map FSDP (jdist.model_parallel.fsdp). Writes bench_results/model_parallel.json.

Run: python benchmarks/model_parallel.py [--quick]
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

import jdist  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.strategies.model_parallel import fsdp  # noqa: E402

MESHES = [
    ("data=8", {"data": 8}, {}),
    ("fsdp=8", {"fsdp": 8}, {"fsdp_axis": "fsdp"}),
    ("model=8", {"model": 8}, {"rules": gpt.TP_RULES}),
    ("data=2 x model=4", {"data": 2, "model": 4}, {"rules": gpt.TP_RULES}),
    ("data=2 x fsdp=2 x model=2", {"data": 2, "fsdp": 2, "model": 2}, {"rules": gpt.TP_RULES, "fsdp_axis": "fsdp"}),
]


def hand_written(loss_fn, optimizer, state):
  """The user's own step: jit with the state's shardings pinned on output."""
  shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, None))


def textbook_bytes(name, axes, cfg, batch, param_bytes):
  n = 8
  if name == "data=8":
    return 2 * (n - 1) / n * param_bytes
  if name == "fsdp=8":
    return 3 * (n - 1) / n * param_bytes
  act = batch * cfg.seq_len * cfg.d_model * 4
  m = axes.get("model", 1)
  tp = 4 * cfg.n_layers * 2 * (m - 1) / m * act / axes.get("data", 1) / axes.get("fsdp", 1)
  return tp  # plus DP / FSDP traffic on the other axes (reported, not added)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64 if args.quick else 128, d_model=128, n_layers=2, n_heads=8)
  batch_size = 16
  params = gpt.init(jax.random.key(0), cfg)
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  host_batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), batch_size, cfg))
  loss_fn = gpt.loss_fn(cfg)
  steps, rounds = (3, 3) if args.quick else (10, 5)
  rows, results = [], {}
  entries = [(name, axes, lambda mesh, kw=kw: jdist.sharded(loss_fn, optax.adam(1e-3), mesh, **kw))
             for name, axes, kw in MESHES]
  entries.append(("fsdp=8 (shard_map)", {"fsdp": 8}, lambda mesh: fsdp(loss_fn, optax.adam(1e-3), mesh)))
  for name, axes, make in entries:
    mesh = jdist.make_mesh(**axes)
    strategy = make(mesh)
    state = strategy.init(params)
    batch = strategy.shard_batch(host_batch)
    optimizer = optax.adam(1e-3)
    hand = hand_written(loss_fn, optimizer, state)
    hand_state = jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))
    times, state, _ = time_against_hand(strategy, state, hand, hand_state, batch, steps=steps, rounds=rounds)
    compiled = strategy.step.lower(state, batch).compile()
    state_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                      for x in jax.tree.leaves((state.params, state.opt_state)))
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    sharding_devices = int(np.prod([n for a, n in axes.items() if a in ("fsdp", "model")])) or 1
    ideal = replicated / sharding_devices
    args_bytes = compiled.memory_analysis().argument_size_in_bytes
    report = jdist.comm_report(compiled)
    expected = textbook_bytes(name.split(" (")[0], axes, cfg, batch_size, param_bytes)
    ratio = times["jdist"] / times["hand"]
    rows.append((name, times["jdist"] * 1e3, times["hand"] * 1e3, ratio, state_bytes / ideal, args_bytes / 1e3,
                 report.total_sent_bytes / 1e3, expected / 1e3))
    results[name] = {"jdist_ms": times["jdist"] * 1e3, "hand_ms": times["hand"] * 1e3, "ratio": ratio,
                     "state_bytes_per_device": state_bytes, "ideal_state_bytes": ideal,
                     "memory_analysis_argument_bytes": args_bytes, "sent_bytes": report.total_sent_bytes,
                     "textbook_bytes": expected, "collectives": {k: v.count for k, v in report.stats.items()}}
  print_table(f"GPT {cfg.num_params() / 1e6:.2f}M params, batch {batch_size} x {cfg.seq_len}, 8 "
              f"{jax.devices()[0].platform} devices (median of {rounds} interleaved rounds x {steps} steps)",
              ["mesh", "jdist ms", "hand ms", "ratio (<=1.05)", "state/ideal", "args KB", "KB sent/dev",
               "textbook KB (TP only on mixed meshes)"], rows)
  for name, r in results.items():
    print(f"  {name}: " + ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()))
  write_json("model_parallel", {"params": cfg.num_params(), "results": results})


if __name__ == "__main__":
  main()
