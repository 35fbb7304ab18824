"""The GPT training step on one GPU: jdist against the plain jax.jit + optax step, same shapes, same run.

Two configurations (those of the team's plain-JAX reference script): 124M-class (d=768, 12 layers, seq
1024, batch 16) and 1B-class (d=2048, 16 layers, seq 2048, batch 8), vocabulary 32768. jdist runs the
GPT through `data_parallel` on a 1-device mesh with bf16 compute and fp32 master weights and optimizer
state (`GPTConfig.compute_dtype`; `--policy wrapper` adds `jdist.precision.mixed_precision`, the
policy for any model), cuDNN attention where available, the blocks as straight-line code or under
`lax.scan`, the state donated; and the same compiled step driven by `jdist.fit`
(host batches, metrics read one step late), to show what the training loop costs. The plain step is the
reference's own code, copied into benchmarks/_plain_gpt.py; all three run on the same tokens, warmed
up, timed in interleaved rounds (median round). The table: step ms, tokens/s, MFU (of the chip's bf16
peak), jdist / plain in tokens/s (goal >= 1) and jdist's compile time. Writes bench_results/gpu_gpt.json
(under $JDIST_BENCH_OUT if set) after every row, so a run cut short keeps what it measured; a row that
fails (out of memory, a compiler error) is recorded with its error, the run goes on, and the script
exits 1 at the end. The plain step is compiled once per configuration; cuDNN attention is tried once, on
a small input, and both steps use XLA's attention where it fails. Keep the figures in benchmarks/RESULTS.md.

Run on a GPU host: python benchmarks/gpu_gpt.py [--unroll N [N ...]] [--remat none|dots_saveable|full [...]]
    [--policy model|wrapper] [--only 124m|1b]
(One jdist row for each --unroll and --remat, each timed against the plain step: by default ``--unroll 0 1``,
the blocks as straight-line code and as a rolled scan, no remat.)
Without a GPU it prints a clear message and exits 0. `--cpu-smoke` runs a tiny configuration on the
CPU to check the code paths. `--static` compiles both steps for the real shapes without running them
and compares XLA's FLOP, byte and memory counts (works on any backend, CPU included).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _common import print_table, time_interleaved, write_json  # noqa: E402

import jdist  # noqa: E402
from jdist.analysis.perf import mfu, peak_flops  # noqa: E402
from jdist.models import gpt  # noqa: E402
from jdist.precision import mixed_precision  # noqa: E402
from jdist.state import TrainState  # noqa: E402

CONFIGS = {
    "124m": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, seq_len=1024, batch=16),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, seq_len=2048, batch=8),
    "cpu-smoke": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, seq_len=64, batch=4),
}


# --- jdist ---------------------------------------------------------------------------------------------

POLICIES = ("model", "wrapper")


def jdist_setup(shape, impl, remat, unroll=1, policy="model"):
  """(strategy, config) for ``shape``: bf16 compute, fp32 master weights, AdamW, a 1-device mesh.

  ``policy="model"``: the GPT casts each weight to bf16 where it uses it (``GPTConfig.compute_dtype``),
  as the plain step does. ``policy="wrapper"``: also ``jdist.precision.mixed_precision``, the policy for
  any model, which casts the whole parameter tree once before the forward pass.
  """
  cfg = gpt.GPTConfig(vocab_size=shape["vocab_size"], seq_len=shape["seq_len"], d_model=shape["d_model"],
                      n_layers=shape["n_layers"], n_heads=shape["n_heads"], compute_dtype=jnp.bfloat16,
                      remat=remat, attention_impl=impl, scan_unroll=unroll)
  mesh = jdist.make_mesh(data=1, devices=jax.devices()[:1])
  loss = gpt.loss_fn(cfg)
  if policy == "wrapper":
    loss = mixed_precision(loss, compute_dtype=jnp.bfloat16)
  return jdist.data_parallel(loss, optax.adamw(3e-4), mesh), cfg


def jdist_abstract(shape, impl, remat, unroll=1, policy="model"):
  """jdist's jitted step and abstract (state, batch) for ``shape``, nothing allocated."""
  strategy, cfg = jdist_setup(shape, impl, remat, unroll, policy)
  params = jax.eval_shape(lambda: gpt.init(jax.random.key(1), cfg))
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(optax.adamw(3e-4).init, params),
                     key=jax.ShapeDtypeStruct((2,), jnp.uint32))
  batch = {"tokens": jax.ShapeDtypeStruct((shape["batch"], shape["seq_len"] + 1), jnp.int32)}
  return strategy.step.jitted, state, batch


# --- the plain reference ---------------------------------------------------------------------------------

def plain_setup(shape, impl):
  """The reference's step (jitted, state donated) and a function making its initial state."""
  import _plain_gpt as plain

  V, D, L, H, S = (shape[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"))
  opt = optax.adamw(3e-4)

  def loss(p, tok):
    logits = plain.fwd(p, tok[:, :-1], H, impl)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  def step(state, tok):
    p, st = state
    l, g = jax.value_and_grad(loss)(p, tok)
    u, st = opt.update(g, st, p)
    return (optax.apply_updates(p, u), st), l

  def init():
    p = plain.init(jax.random.key(1), V, D, L, H, S)
    return p, opt.init(p)

  return jax.jit(step, donate_argnums=(0,)), init


def host_tokens(shape):
  """The tokens every step of a comparison trains on, on the host: ``{"tokens": int32[batch, S + 1]}``."""
  cfg = gpt.GPTConfig(vocab_size=shape["vocab_size"], seq_len=shape["seq_len"])
  return jax.device_get(gpt.synthetic_tokens(jax.random.key(2), shape["batch"], cfg))


def jdist_runner(strategy, cfg, host_batch, box):
  """A function running one jdist step on ``host_batch``; its state (fresh, donated) lives in ``box["jdist"]``."""
  box["jdist"], batch = strategy.init(gpt.init(jax.random.key(1), cfg)), strategy.shard_batch(host_batch)

  def run():
    box["jdist"], metrics = strategy.step(box["jdist"], batch)
    return metrics["loss"]
  return run


def plain_runner(plain, host_batch, box):
  """The same for the plain step ``plain = plain_setup(...)``; its state lives in ``box["plain"]``."""
  plain_step, plain_init = plain
  box["plain"], tokens = plain_init(), jnp.asarray(host_batch["tokens"])

  def run():
    box["plain"], loss = plain_step(box["plain"], tokens)
    return loss
  return run


def compare(shape, impl, *, plain=None, remat="none", unroll=1, policy="model", steps=10, rounds=3, with_fit=False):
  """jdist's step and the plain step on the same tokens, timed in interleaved rounds (``steps`` steps a
  round, the median round counts), so drift on the card hits both alike; ``with_fit`` adds to each round
  ``steps`` steps of the same compiled jdist step driven by ``jdist.fit`` (host batches in, metrics out:
  the loop a user runs), warmed up like the others. ``plain``: ``plain_setup(shape, impl)``, passed in to
  reuse its compiled step across calls.

  Returns ``{"step_s", "plain_step_s", "fit_step_s" (None without ``with_fit``), "compile_s" (jdist's first
  step less a timed one: tracing and compiling), "flops" (model FLOPs per step)}``.
  """
  strategy, cfg = jdist_setup(shape, impl, remat, unroll, policy)
  host_batch = host_tokens(shape)
  box: dict = {}
  run_jdist = jdist_runner(strategy, cfg, host_batch, box)
  run_plain = plain_runner(plain or plain_setup(shape, impl), host_batch, box)

  def run_fit():  # `steps` steps of the same compiled step through jdist.fit: host batches in, metrics out
    state = box.pop("jdist")
    result = jdist.fit(strategy, state, itertools.repeat(host_batch), steps=int(state.step) + steps, log_every=steps)
    box["jdist"] = result.state
    return result.state.params

  t = time.perf_counter()
  jax.block_until_ready(run_jdist())  # traced and compiled here
  first_call_s = time.perf_counter() - t
  fns = {"jdist": run_jdist, "plain": run_plain, **({"fit": run_fit} if with_fit else {})}
  times = time_interleaved(fns, steps=steps, rounds=rounds, warmup=3, steps_per_call={"fit": steps})
  fit_dt = times.get("fit")
  return {"step_s": times["jdist"], "plain_step_s": times["plain"], "fit_step_s": fit_dt,
          "compile_s": first_call_s - times["jdist"],
          "flops": gpt.flops_per_token(cfg) * shape["batch"] * shape["seq_len"]}


# --- static comparison -----------------------------------------------------------------------------------

def _costs(compiled):
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # None where the backend gives none
  mem = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
          "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
          "alias_bytes": getattr(mem, "alias_size_in_bytes", None)}


def static_compare(name, impl, remat, policy="model"):
  """Compiles jdist's and the plain step for CONFIGS[name] without running them; XLA's counts of each.

  XLA's cost analysis counts a loop body once, whatever its trip count, so jdist's blocks are unrolled
  here (``scan_unroll=True``: the same arithmetic as the scan, tested in tests/test_precision.py).
  """
  shape = CONFIGS[name]
  step, state, batch = jdist_abstract(shape, impl, remat, unroll=True, policy=policy)
  t = time.perf_counter()
  ours = _costs(step.lower(state, batch).compile())
  ours["compile_s"] = time.perf_counter() - t
  return ours, _plain_costs(name, impl)


@functools.cache
def _plain_costs(name, impl):
  """XLA's counts of the plain step for CONFIGS[name], compiled once per configuration."""
  shape = CONFIGS[name]
  plain_step, init = plain_setup(shape, impl)
  tok = jax.ShapeDtypeStruct((shape["batch"], shape["seq_len"] + 1), jnp.int32)
  t = time.perf_counter()
  theirs = _costs(plain_step.lower(jax.eval_shape(init), tok).compile())
  theirs["compile_s"] = time.perf_counter() - t
  return theirs


def cudnn_attention_works() -> bool:
  """Whether cuDNN's fused attention runs here (a GPU, and a cuDNN that supports it); tried once, small."""
  q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
  try:
    f = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"))
    jax.block_until_ready(f(q))
    return True
  except Exception as e:  # noqa: BLE001 (any failure means: not here)
    print(f"cuDNN attention unavailable ({str(e)[:200]}); both steps use XLA's attention", flush=True)
    return False


def matmul_ceiling(n=8192, reps=20):
  """Measured bf16 matmul FLOP/s (the reference script's ceiling)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  t = time.perf_counter()
  for _ in range(reps):
    out = mm(a, a)
  jax.block_until_ready(out)
  return 2 * n**3 * reps / (time.perf_counter() - t)


def main_static(args) -> None:
  names = [args.only] if args.only else ["124m", "1b"]
  impl = "cudnn" if jax.devices()[0].platform == "gpu" and cudnn_attention_works() else None
  rows, results = [], {"device": jax.devices()[0].device_kind, "policy": args.policy, "runs": []}
  gib = lambda b: b / 2**30 if b is not None else float("nan")
  for name, remat in itertools.product(names, args.remat):
    ours, theirs = static_compare(name, impl, remat, args.policy)
    results["runs"].append({"config": name, "remat": remat, "jdist": ours, "plain": theirs})
    rows.append((name, remat, ours["flops"] / 1e12, theirs["flops"] / 1e12, ours["flops"] / theirs["flops"],
                 ours["bytes_accessed"] / theirs["bytes_accessed"], gib(ours["temp_bytes"]),
                 gib(theirs["temp_bytes"]), ours["compile_s"], theirs["compile_s"]))
  print_table(f"Compiled GPT steps on {results['device']} (not run): XLA's counts, policy={args.policy}, "
              f"jdist's blocks unrolled for the count (the plain step has no remat)",
              ["config", "remat", "jdist TFLOP", "plain TFLOP", "FLOP ratio", "bytes ratio", "jdist temp GiB",
               "plain temp GiB", "jdist compile s", "plain compile s"], rows)
  write_json("gpu_gpt_static", results)


TABLE_KEYS = ("jdist_step_ms", "jdist_fit_step_ms", "plain_step_ms", "jdist_tokens_per_s", "plain_tokens_per_s",
              "jdist_mfu", "jdist_fit_mfu", "plain_mfu", "ratio_tokens_per_s", "ratio_fit_tokens_per_s",
              "jdist_compile_s")


def run_row(name, shape, impl, unroll, remat, plain, args, n, peak) -> dict:
  """One jdist configuration timed against the plain step; a failure (out of memory, a compiler error) is
  recorded in the row and the run goes on to the next."""
  blocks = "all" if not unroll else unroll
  try:
    r = compare(shape, impl, plain=plain, remat=remat, unroll=unroll or True, policy=args.policy, steps=n,
                rounds=args.rounds, with_fit=True)
  except Exception as e:  # noqa: BLE001
    return {"config": name, "unroll": blocks, "remat": remat, "error": f"{type(e).__name__}: {str(e)[:500]}"}
  tokens = shape["batch"] * shape["seq_len"]
  t_j, t_f, t_p, flops = r["step_s"], r["fit_step_s"], r["plain_step_s"], r["flops"]
  m = lambda t: mfu(flops, t, peak) if peak else None  # None (JSON null, "-" in the table): peak unknown
  return {"config": name, "unroll": blocks, "remat": remat, "attention": impl or "xla", "jdist_step_ms": t_j * 1e3,
          "jdist_fit_step_ms": t_f * 1e3, "plain_step_ms": t_p * 1e3, "jdist_tokens_per_s": tokens / t_j,
          "jdist_fit_tokens_per_s": tokens / t_f, "plain_tokens_per_s": tokens / t_p, "jdist_mfu": m(t_j),
          "jdist_fit_mfu": m(t_f), "plain_mfu": m(t_p), "ratio_tokens_per_s": t_p / t_j,
          "ratio_fit_tokens_per_s": t_p / t_f, "jdist_compile_s": r["compile_s"]}



def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--remat", nargs="+", default=["none"], choices=gpt.REMAT_POLICIES,
                      help="remat policies; several give one jdist row each (with each --unroll)")
  parser.add_argument("--policy", default="model", choices=POLICIES,
                      help="bf16 casts: by the model where each weight is used, or by the mixed_precision wrapper")
  parser.add_argument("--unroll", type=int, nargs="+", default=[0, 1],
                      help="GPT blocks per scan iteration (1: a rolled loop; 0: every block, straight-line code); "
                           "several values give one jdist row each, every one timed against the plain step")
  parser.add_argument("--only", choices=["124m", "1b"], default=None)
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, to check the code paths")
  parser.add_argument("--static", action="store_true", help="compile only; compare XLA's counts (any backend)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (jdist, plain, jdist, ...)")
  parser.add_argument("--quick", action="store_true", help="5 steps a round instead of --steps")
  args = parser.parse_args()
  if any(u < 0 for u in args.unroll):
    parser.error(f"--unroll takes block counts >= 0 (0: all blocks), got {args.unroll}")
  n = 5 if args.quick else args.steps
  if args.static:
    return main_static(args)
  device = jax.devices()[0]
  if args.cpu_smoke:
    names, impl = ["cpu-smoke"], None
  else:
    if device.platform != "gpu":
      print(f"benchmarks/gpu_gpt.py needs a GPU; this host's JAX sees {device.platform} devices only. Skipping. "
            f"(--static compares the compiled steps on any backend; --cpu-smoke runs tiny shapes here.)")
      return
    names = [args.only] if args.only else ["124m", "1b"]
    impl = "cudnn" if cudnn_attention_works() else None
  peak = peak_flops(device)
  results = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__, "peak_flops": peak,
             "policy": args.policy, "steps": n, "rounds": args.rounds, "runs": []}
  if device.platform == "gpu":
    results["matmul_bf16_flops"] = matmul_ceiling()
    print(f"{results['device']}: bf16 matmul {results['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s", flush=True)
  rows = []
  for name in names:
    shape = CONFIGS[name]
    plain = plain_setup(shape, impl)  # compiled once per configuration, timed beside every jdist row
    for unroll, remat in itertools.product(args.unroll, args.remat):
      row = run_row(name, shape, impl, unroll, remat, plain, args, n, peak)
      results["runs"].append(row)
      print(row, flush=True)
      write_json("gpu_gpt", results)  # after every row: a run cut short keeps what it measured
      if "error" not in row:
        rows.append((name, row["unroll"], remat, *(row[k] for k in TABLE_KEYS)))
  peak_text = f"peak {peak:.3g} FLOP/s" if peak else "peak unknown: no MFU"
  print_table(f"GPT step on {results['device']} ({peak_text}), policy={args.policy}, median of {args.rounds} "
              f"interleaved rounds of {n} steps; goal jdist/plain >= 1 (blocks: per scan iteration)",
              ["config", "blocks", "remat", "jdist ms", "fit ms", "plain ms", "jdist tok/s", "plain tok/s", "jdist MFU",
               "fit MFU", "plain MFU", "jdist/plain", "fit/plain", "jdist compile s"], rows)
  if any("error" in row for row in results["runs"]):
    sys.exit("some rows failed; their errors are in the JSON and above")

if __name__ == "__main__":
  main()
