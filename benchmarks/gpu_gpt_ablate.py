"""Where jdist's GPT step spends time against the plain step: one variant at a time, each timed beside the
plain step in interleaved rounds (as benchmarks/gpu_gpt.py does), on one GPU.

Variants (jdist's GPT through ``data_parallel`` on a 1-device mesh, bf16 compute, cuDNN attention where it
runs):
  straight   every block unrolled (``scan_unroll=True``): gpu_gpt.py's straight-line row
  no_norm    straight, without the ``grad_norm`` metric (its reduction over every gradient)
  plain_emb  straight, with the embedding read as the plain step reads it: no check of the input ids (one
             outside the vocabulary is clamped instead of making the loss NaN; the targets' check is part
             of the cross-entropy, which optax_ce replaces)
  lean       no_norm and plain_emb together
  optax_ce   straight, with the loss through ``optax.softmax_cross_entropy_with_integer_labels`` (a gathered
             target logit, as the plain step has it) instead of ``gpt.cross_entropy`` (a masked sum)
  scanU      blocks under ``lax.scan``, U blocks per iteration
  any of these with a suffix _R: remat policy R (``GPTConfig.remat``: none, dots_saveable, full)
  and then _nocse: the remat regions without their CSE barrier (``jax.checkpoint(..., prevent_cse=False)``,
             which JAX's docs call safe inside ``lax.scan``: the forward and backward loops cannot be merged)

``no_norm``, ``plain_emb``, ``lean`` and ``optax_ce`` patch jdist while their step is traced: they measure what a
feature costs and are not options a user has. Writes bench_results/gpu_gpt_ablate.json (under
$JDIST_BENCH_OUT if set) after every variant. Without a GPU it exits with a message, except with
``--cpu-smoke`` (tiny shapes, to check the code paths).

Run: python benchmarks/gpu_gpt_ablate.py [--only 124m|1b] [--variants straight scan1 ...] [--deadline S]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax  # noqa: E402
import optax  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from gpu_gpt import CONFIGS, compare, cudnn_attention_works, plain_setup  # noqa: E402

from jdist.analysis.perf import mfu, peak_flops  # noqa: E402
from jdist.models import gpt  # noqa: E402

dp_module = importlib.import_module("jdist.strategies.data_parallel")

DEFAULT_VARIANTS = ("straight", "no_norm", "plain_emb", "lean", "optax_ce", "scan1", "scan1_dots_saveable",
                    "scan2_dots_saveable", "scan4", "scan1_full", "straight")


@contextlib.contextmanager
def patched(module, **attrs):
  old = {k: getattr(module, k) for k in attrs}
  for k, v in attrs.items():
    setattr(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(module, k, v)


def _plain_embed(params, tokens, config):
  return (params["wte"][tokens] + params["wpe"][:tokens.shape[1]]).astype(config.compute_dtype)


def _patches(variant):
  base, _, remat = parse_variant(variant)
  stack = contextlib.ExitStack()
  if variant.endswith(NOCSE):
    stack.enter_context(patched(jax, checkpoint=functools.partial(jax.checkpoint, prevent_cse=False)))
  if base in ("no_norm", "lean"):
    metrics_from = dp_module.metrics_from
    stack.enter_context(patched(dp_module, metrics_from=lambda loss, grads, aux, step, **extra: metrics_from(
        loss, {}, aux, step, **extra)))
  if base in ("plain_emb", "lean"):
    stack.enter_context(patched(gpt, embed=_plain_embed, valid_tokens=lambda tokens, config, *, max_len: tokens))
  if base == "optax_ce":
    optax_ce = lambda logits, targets: optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    stack.enter_context(patched(gpt, cross_entropy=optax_ce))
  return stack


BASES = ("straight", "no_norm", "plain_emb", "lean", "optax_ce")


NOCSE = "_nocse"


def parse_variant(variant):
  """(base, unroll, remat) of a variant name ``BASE[_REMAT][_nocse]``, BASE one of BASES or scanU."""
  name = variant.removesuffix(NOCSE)
  for remat in gpt.REMAT_POLICIES:
    if name.endswith("_" + remat):
      base = name[:-len(remat) - 1]
      break
  else:
    base, remat = name, "none"
  if base.startswith("scan") and base[4:].isdigit() and int(base[4:]) >= 1:
    return base, int(base[4:]), remat
  if base not in BASES:
    raise ValueError(f"unknown variant {variant!r}: expected BASE[_REMAT][{NOCSE}], BASE in {BASES} or scanU "
                     f"(U >= 1), REMAT in {gpt.REMAT_POLICIES}")
  return base, True, remat


def run_variant(variant, shape, impl, plain, steps, rounds):
  """``gpu_gpt.compare`` for one variant, jdist's step traced under the variant's patches."""
  _, unroll, remat = parse_variant(variant)
  with _patches(variant):
    return compare(shape, impl, plain=plain, remat=remat, unroll=unroll, steps=steps, rounds=rounds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=["124m", "1b"], default=None)
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
  parser.add_argument("--variants-1b", nargs="+", default=None, help="variants for 1b (default: --variants)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds; later variants are skipped")
  parser.add_argument("--quick", action="store_true", help="what `jdist bench --quick` passes: fewer steps")
  parser.add_argument("--cpu-smoke", action="store_true")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.rounds = min(args.steps, 5), min(args.rounds, 3)
  for v in set(args.variants) | set(args.variants_1b or ()):
    parse_variant(v)
  t0 = time.perf_counter()
  device = jax.devices()[0]
  if args.cpu_smoke:
    names, impl = ["cpu-smoke"], None
  elif device.platform != "gpu":
    print(f"benchmarks/gpu_gpt_ablate.py needs a GPU; this host's JAX sees {device.platform} devices only. Skipping.")
    return
  else:
    names = [args.only] if args.only else ["124m", "1b"]
    impl = "cudnn" if cudnn_attention_works() else None
  peak = peak_flops(device)
  results = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__, "peak_flops": peak,
             "steps": args.steps, "rounds": args.rounds, "runs": []}
  rows = []
  for name in names:
    shape = CONFIGS[name]
    plain = plain_setup(shape, impl)  # compiled once, timed beside every variant
    variants = args.variants_1b if (name == "1b" and args.variants_1b) else args.variants
    for variant in variants:
      if time.perf_counter() - t0 > args.deadline:
        results["runs"].append({"config": name, "variant": variant, "skipped": "deadline"})
        continue
      try:
        r = run_variant(variant, shape, impl, plain, args.steps, args.rounds)
      except Exception as e:  # noqa: BLE001 (recorded; the run goes on)
        row = {"config": name, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:400]}"}
      else:
        tj, tp = r["step_s"], r["plain_step_s"]
        row = {"config": name, "variant": variant, "jdist_ms": tj * 1e3, "plain_ms": tp * 1e3, "ratio": tp / tj,
               "jdist_mfu": mfu(r["flops"], tj, peak) if peak else None, "compile_s": r["compile_s"]}
        rows.append((name, variant, tj * 1e3, tp * 1e3, tp / tj, row["jdist_mfu"] or float("nan"), r["compile_s"]))
      results["runs"].append(row)
      print(row, f"[{time.perf_counter() - t0:.0f} s]", flush=True)
      write_json("gpu_gpt_ablate", results)
  print_table(f"jdist GPT step variants against the plain step on {results['device']}, median of {args.rounds} "
              f"interleaved rounds of {args.steps} steps (ratio: plain ms / jdist ms)",
              ["config", "variant", "jdist ms", "plain ms", "ratio", "jdist MFU", "compile s"], rows)


if __name__ == "__main__":
  main()
