"""The planner's step-time model against published training runs nobody on the team made.

Each row is a published configuration (model sizes, layout, batch, cluster) and its published throughput; the
planner predicts it with the same model and constants it uses for a user's plan (``jdist.analysis.plan``):
nothing here is tuned per row. ``--calibrate`` recomputes the one fitted constant, SOFTWARE_EFFICIENCY, from
its one reference point (jdist's 1B GPT on one H200); every other row is a prediction.

  python benchmarks/plan_validation.py              # markdown table of predicted vs published, with errors
  python benchmarks/plan_validation.py --calibrate  # the constant from the reference row
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_json  # noqa: E402
from jdist.analysis.plan import Layout, TransformerShape, load_cluster, step_time, textbook_costs  # noqa: E402

KORTHIKANTI = ("Korthikanti et al. 2022, \"Reducing Activation Recomputation in Large Transformer Models\" "
               "(arXiv 2205.05198), Tables 3 and 5, Sec. 6.3")
MAXTEXT_V5E = "MaxText MaxText/configs/v5e/README.md (AI-Hypercomputer/maxtext), configs 16b.sh / 32b.sh / 64b.sh"
MAXTEXT_V5P = "MaxText MaxText/configs/v5p/README.md (AI-Hypercomputer/maxtext), configs 32b.sh / 64b.sh"
PALM = "Chowdhery et al. 2022, \"PaLM\" (arXiv 2204.02311), Sec. 4 and Table 3"
JDIST = "benchmarks/RESULTS.md, GPU section, run 3 (jdist straight / none)"


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  source: str
  shape: TransformerShape
  layout: Layout
  batch: int  # global batch, sequences
  cluster: str
  devices: int
  published: float  # in ``unit``
  unit: str  # "s/step" or "TFLOP/s/chip" (MaxText's count) or "tokens/s"
  flops_per_token: float = 0.0  # the source's own count, to turn its TFLOP/s into tokens/s
  devices_per_node: int = 0  # override the cluster file's (PaLM: pods of 3072)
  reference: bool = False  # the calibration point


def _megatron(h: int, layers: int, heads: int) -> TransformerShape:
  # Megatron's GPT: tied embeddings, learned positions, 4h MLP, fp16 activations, unfused (materialised) softmax
  return TransformerShape(name=f"GPT h{h} L{layers}", d_model=h, n_layers=layers, n_heads=heads, seq_len=2048,
                          vocab_size=51200, position_table=True, flash_attention=False, vocab_parallel=True)


def _maxtext(scale: int) -> TransformerShape:
  """MaxText's base model (emb 2048, 16 heads of 128, gated MLP 7168, 16 layers, vocab 32000, untied) scaled by
  ``global_parameter_scale`` as pyconfig.get_individual_scales does."""
  log2 = scale.bit_length() - 1
  base, rem = divmod(log2, 3)
  heads, emb = 2 ** (base + (rem > 0)), 2 ** (base + (rem > 1))
  return TransformerShape(name=f"MaxText {scale}B", d_model=2048 * emb, n_layers=16 * 2**base, n_heads=16 * heads,
                          head_dim=128, d_ff=7168 * heads, gated_mlp=True, seq_len=2048, vocab_size=32000, tied=False,
                          flash_attention=True, vocab_parallel=True)


def _maxtext_flops(shape: TransformerShape) -> float:
  """MaxText's TFLOP/s count per token (maxtext_utils.calculate_tflops_training_per_device, 2023-24): 6 x all
  parameters plus causal attention, 12 L q_dim S / 2."""
  return 6 * shape.num_params() + 6 * shape.n_layers * shape.q_dim * shape.seq_len


def rows() -> list[Row]:
  out = []
  kort = [("22B", 6144, 48, 64, 1, 8, 4, 1, 1.42, 1.10), ("175B", 12288, 96, 96, 8, 64, 64, 3, 18.13, 13.75),
          ("530B", 20480, 105, 128, 35, 280, 280, 3, 49.05, 37.83),
          ("1T", 25600, 128, 160, 64, 512, 512, 1, 94.42, 71.49)]
  for name, h, layers, heads, pipe, gpus, gbs, v, full_s, present_s in kort:
    shape = _megatron(h, layers, heads)
    m = gbs // (4 if name == "22B" else 1)  # micro-batch 4 for 22B, 1 for the others: m micro-batches per step
    for remat, sp, t in (("full", False, full_s), ("selective", True, present_s)):
      layout = Layout(model=8, pipe=pipe, microbatches=m if pipe > 1 else 1, virtual=v, remat=remat,
                      sequence_parallel=sp, overlap_grad_reduce=False)
      label = "full recompute" if remat == "full" else "selective + SP"
      out.append(Row(f"Megatron {name} TP8 PP{pipe}, {gpus} A100, {label}", KORTHIKANTI, shape, layout, gbs, "a100-8x",
                     gpus, t, "s/step"))
  shape = _megatron(20480, 105, 128)  # the 530B model with 8-way data parallelism: 2240 GPUs, 8x the batch
  out.append(Row("Megatron 530B TP8 PP35 DP8, 2240 A100, selective + SP", KORTHIKANTI, shape,
                 Layout(data=8, model=8, pipe=35, microbatches=280, virtual=3, remat="selective",
                        sequence_parallel=True, overlap_grad_reduce=False), 2240, "a100-8x", 2240, 39.15, "s/step"))
  v5e = {16: (6, [120, 117, 117, 115, 111, 108]), 32: (4, [132, 128, 126, 125, 123, 119]),
         64: (2, [118, 112, 110, 108, 105, 99])}
  for scale, (pdbs, tflops) in v5e.items():
    shape = _maxtext(scale)
    for slices, tf in zip((1, 2, 4, 8, 16, 32), tflops):
      if scale == 64 and slices not in (1, 32):
        continue
      chips = 256 * slices
      layout = Layout(data=slices, fsdp=256, remat="full")
      out.append(Row(f"MaxText {scale}B, {slices}x v5e-256, FSDP 256, remat full", MAXTEXT_V5E, shape, layout,
                     pdbs * chips, "tpu-v5e-256", chips, tf, "TFLOP/s/chip", _maxtext_flops(shape)))
  for scale, pdbs, tflops in ((32, 7, (328, 319)), (64, 3, (323, 309))):
    shape = _maxtext(scale)
    for slices, tf in zip((1, 2), tflops):
      chips = 64 * slices  # v5p-128 is 64 chips (the name counts TensorCores)
      layout = Layout(data=slices, fsdp=16, model=4, remat="dots_saveable")
      out.append(Row(f"MaxText {scale}B, {slices}x v5p-128, FSDP 16 x TP 4, remat minimal", MAXTEXT_V5P, shape, layout,
                     pdbs * chips, "tpu-v5p", chips, tf, "TFLOP/s/chip", _maxtext_flops(shape)))
  palm = TransformerShape(name="PaLM 540B", d_model=18432, n_layers=118, n_heads=48, head_dim=256, n_kv_heads=1,
                          d_ff=73728, gated_mlp=True, seq_len=2048, vocab_size=256000, flash_attention=False)
  out.append(Row("PaLM 540B, 2 pods x 3072 TPU v4, model 12 x FSDP 256 x data 2, remat", PALM, palm,
                 Layout(data=2, fsdp=256, model=12, remat="full"), 2048, "tpu-v4", 6144, 238.3e3, "tokens/s",
                 devices_per_node=3072))
  for name, d, layers, heads, seq, b, ms, ref in (("1B", 2048, 16, 16, 2048, 8, 172.7, True),
                                                  ("124M", 768, 12, 12, 1024, 16, 30.30, False)):
    shape = TransformerShape(name=f"jdist GPT {name}", d_model=d, n_layers=layers, n_heads=heads, seq_len=seq,
                             vocab_size=32768, position_table=True, flash_attention=True, vocab_parallel=False)
    out.append(Row(f"jdist GPT {name}, 1 H200, straight, no remat", JDIST, shape, Layout(), b, "h200-8x", 1,
                   ms / 1e3, "s/step", reference=ref))
  return out


def predict(row: Row, **kw):
  cluster = load_cluster(row.cluster, devices=row.devices)
  if row.devices_per_node:
    cluster = dataclasses.replace(cluster, devices_per_node=row.devices_per_node)
  timing = step_time(textbook_costs(row.shape, row.layout, row.batch), row.layout, cluster, **kw)
  tokens_per_s = row.batch * row.shape.seq_len / timing.step
  if row.unit == "s/step":
    value = timing.step
  elif row.unit == "tokens/s":
    value = tokens_per_s
  else:
    value = tokens_per_s * row.flops_per_token / row.devices / 1e12
  return value, timing


def error(row: Row, predicted: float) -> float:
  """Relative error of the predicted throughput (a time's error is turned into the throughput's)."""
  return row.published / predicted - 1 if row.unit == "s/step" else predicted / row.published - 1


def calibrate() -> float:
  """SOFTWARE_EFFICIENCY such that the reference row's predicted step equals the measured one."""
  ref = next(r for r in rows() if r.reference)
  lo, hi = 0.05, 1.0
  for _ in range(60):  # the step time falls as the efficiency rises: bisect
    mid = (lo + hi) / 2
    if predict(ref, software_efficiency=mid)[0] > ref.published:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def table() -> tuple[str, list[dict]]:
  lines = ["| run | devices | published | predicted | error | predicted MFU | comm share | bubble |",
           "|---|---|---|---|---|---|---|---|"]
  records = []
  for row in rows():
    value, t = predict(row)
    err = error(row, value)
    fmt = (lambda x: f"{x:.3g} s") if row.unit == "s/step" else (
        (lambda x: f"{x / 1e3:.1f}K tok/s") if row.unit == "tokens/s" else (lambda x: f"{x:.0f} TF/s/chip"))
    err_s = "reference (0 by construction)" if row.reference else f"{err:+.1%}"
    lines.append(f"| {row.name} | {row.devices} | {fmt(row.published)} | {fmt(value)} | {err_s} | {t.mfu:.1%} | "
                 f"{t.comm_share:.1%} | {t.bubble_share:.1%} |")
    records.append({"name": row.name, "source": row.source, "published": row.published, "unit": row.unit,
                    "predicted": value, "error": err, "mfu": t.mfu, "reference": row.reference})
  return "\n".join(lines), records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calibrate", action="store_true", help="print SOFTWARE_EFFICIENCY from the reference row")
  parser.add_argument("--quick", action="store_true", help="(the same: the table takes well under a second)")
  args = parser.parse_args(argv)
  if args.calibrate:
    print(f"SOFTWARE_EFFICIENCY = {calibrate():.4f}")
    return 0
  text, records = table()
  print(text)
  errors = [abs(r["error"]) for r in records if not r["reference"]]
  print(f"\n{len(errors)} predicted rows: median |error| {sorted(errors)[len(errors) // 2]:.1%}, "
        f"max {max(errors):.1%}, {sum(e <= 0.2 for e in errors)} within 20%")
  write_json("plan_validation", {"rows": records})
  return 0


if __name__ == "__main__":
  sys.exit(main())
