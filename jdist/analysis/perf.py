"""Model FLOPs utilisation: the share of the chip's peak that the model's arithmetic uses."""
from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per chip (vendor figures, without sparsity), keyed by a part of JAX's
# ``device_kind``; the longest key that matches wins ("L40S" before "L40" before "L4", "TPU v5 lite"
# before "TPU v5").
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe parts are lower (756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The bf16 dense peak of ``device`` (default: the first device), or None if its kind is unknown."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  if "PCIe" in kind and "H100" in kind:
    return 756e12
  if "NVL" in kind and ("H100" in kind or "H200" in kind):  # the NVL (PCIe-card) parts: 835 TFLOP/s dense bf16
    return 835e12
  for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_BF16_FLOPS[name]
  return None


def mfu(flops_per_step: float, step_time_s: float, peak: float | None = None) -> float | None:
  """Model FLOPs utilisation: ``flops_per_step / step_time_s / peak`` (None if the peak is unknown).

  For the GPT use ``jdist.models.gpt.flops_per_token(cfg) * tokens_per_step``: 6 N per token for the N
  weights (forward 2 N, backward 4 N) plus the causal attention term 12 L D S / 2, the count the team's
  plain-JAX reference benchmark uses.
  """
  if peak is not None and not peak > 0:
    raise ValueError(f"peak must be a positive FLOP/s figure (or None: the device's), got {peak!r}.")
  peak = peak if peak is not None else peak_flops()
  if peak is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / peak
