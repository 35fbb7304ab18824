"""The GPT training step on one GPU: jdist against the plain jax.jit + optax step, same shapes, same run.

Two configurations (those of shared/reference/plain_jax_gpt.py): 124M-class (d=768, 12 layers, seq
1024, batch 16) and 1B-class (d=2048, 16 layers, seq 2048, batch 8), vocabulary 32768. jdist runs the
GPT through `data_parallel` on a 1-device mesh with bf16 compute and fp32 master weights and optimizer
state (`jdist.precision.mixed_precision` plus `GPTConfig.compute_dtype`), cuDNN attention where
available, blocks under `lax.scan`, the state donated. The plain step is the reference's own code,
copied into benchmarks/_plain_gpt.py. The table: step ms, tokens/s, MFU (of the chip's bf16 peak) and
jdist / plain in tokens/s. Writes bench_results/gpu_gpt.json; keep the figures in benchmarks/RESULTS.md.

Run on a GPU host: python benchmarks/gpu_gpt.py [--remat none|dots_saveable|full] [--only 124m|1b]
Without a GPU it prints a clear message and exits 0; `--cpu-smoke` runs a tiny configuration on the
CPU to check the code paths.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.perf import mfu, peak_flops  # noqa: E402
from jdist.precision import mixed_precision  # noqa: E402

CONFIGS = {
    "124m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch=16),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, seq_len=2048, batch=8),
    "cpu-smoke": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, seq_len=64, batch=4),
}


def timed(step, state, batch, n):
  state, out = step(state, batch)
  jax.block_until_ready(out)
  for _ in range(3):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(n):
    state, out = step(state, batch)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n, state


def run_jdist(shape, impl, remat, n):
  cfg = gpt.GPTConfig(vocab_size=shape["vocab_size"], seq_len=shape["seq_len"], d_model=shape["d_model"],
                      n_layers=shape["n_layers"], n_heads=shape["n_heads"], compute_dtype=jnp.bfloat16,
                      remat=remat, attention_impl=impl)
  mesh = jdist.make_mesh(data=1, devices=jax.devices()[:1])
  loss = mixed_precision(gpt.loss_fn(cfg), compute_dtype=jnp.bfloat16)
  strategy = jdist.data_parallel(loss, optax.adamw(3e-4), mesh)
  state = strategy.init(gpt.init(jax.random.key(1), cfg))
  batch = strategy.shard_batch(gpt.synthetic_tokens(jax.random.key(2), shape["batch"], cfg))
  step = lambda s, b: (lambda out: (out[0], out[1]["loss"]))(strategy.step(s, b))
  dt, _ = timed(step, state, batch, n)
  return dt, gpt.flops_per_token(cfg) * shape["batch"] * shape["seq_len"]


def run_plain(shape, impl, n):
  import _plain_gpt as plain

  V, D, L, H, S, B = (shape[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "batch"))
  p = plain.init(jax.random.key(1), V, D, L, H, S)
  opt = optax.adamw(3e-4)

  def loss(p, tok):
    logits = plain.fwd(p, tok[:, :-1], H, impl)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  def step(state, tok):
    p, st = state
    l, g = jax.value_and_grad(loss)(p, tok)
    u, st = opt.update(g, st, p)
    return (optax.apply_updates(p, u), st), l

  step = jax.jit(step, donate_argnums=(0,))
  tok = jax.random.randint(jax.random.key(2), (B, S + 1), 0, V)
  dt, _ = timed(step, (p, opt.init(p)), tok, n)
  return dt


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--remat", default="none", choices=gpt.REMAT_POLICIES)
  parser.add_argument("--only", choices=["124m", "1b"], default=None)
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, to check the code paths")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  device = jax.devices()[0]
  if args.cpu_smoke:
    names, impl = ["cpu-smoke"], None
  else:
    if device.platform != "gpu":
      print(f"benchmarks/gpu_gpt.py needs a GPU; this host's JAX sees {device.platform} devices only. Skipping.")
      return
    names = [args.only] if args.only else ["124m", "1b"]
    impl = "cudnn"
  peak = peak_flops(device)
  rows, results = [], {"device": getattr(device, "device_kind", device.platform), "peak_flops": peak}
  for name in names:
    shape = CONFIGS[name]
    tokens = shape["batch"] * shape["seq_len"]
    try:
      t_j, flops = run_jdist(shape, impl, args.remat, args.steps)
      t_p = run_plain(shape, impl, args.steps)
    except Exception as e:  # cuDNN attention unavailable: fall back to XLA's
      if impl is None:
        raise
      print(f"{name}: cudnn attention failed ({str(e)[:200]}); using the XLA implementation")
      t_j, flops = run_jdist(shape, None, args.remat, args.steps)
      t_p = run_plain(shape, None, args.steps)
    m_j, m_p = mfu(flops, t_j, peak), mfu(flops, t_p, peak)
    ratio = t_p / t_j
    rows.append((name, t_j * 1e3, t_p * 1e3, tokens / t_j, tokens / t_p, m_j if m_j is not None else float("nan"),
                 m_p if m_p is not None else float("nan"), ratio))
    results[name] = {"jdist_step_ms": t_j * 1e3, "plain_step_ms": t_p * 1e3, "jdist_tokens_per_s": tokens / t_j,
                     "plain_tokens_per_s": tokens / t_p, "jdist_mfu": m_j, "plain_mfu": m_p,
                     "ratio_tokens_per_s": ratio, "remat": args.remat}
  print_table(f"GPT step on {results['device']} (peak {peak or 0:.3g} FLOP/s), remat={args.remat}",
              ["config", "jdist ms", "plain ms", "jdist tok/s", "plain tok/s", "jdist MFU", "plain MFU",
               "jdist/plain tok/s (goal >= 1)"], rows)
  write_json("gpu_gpt", results)


if __name__ == "__main__":
  main()
