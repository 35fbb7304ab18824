"""The step-time model: compute at a calibrated fraction of peak, collectives by alpha-beta per link, the
pipeline bubble, and an explicit overlap rule.

  compute  = FLOPs / (peak x matmul_efficiency x SOFTWARE_EFFICIENCY) + non-matmul bytes / HBM bandwidth
  tensor   = sum over the model axis' all-reduces of (steps x latency + bytes sent / link bandwidth)   (exposed)
  pipe     = the same for the activations passed between stages                                    (exposed)
  data     = FSDP's gathers and reduce-scatters run under the compute (XLA's async collectives inside the
             layer loop) and only what exceeds it shows; the data axis' gradient all-reduce joins them with
             ``overlap_grad_reduce``, else it all shows (jdist reduces the gradients after the backward pass)
  bubble   = (p - 1) / (v m) x (compute + tensor + pipe)
  step     = compute + tensor + pipe + bubble + exposed data

``matmul_efficiency`` is the chip's (a matmul microbenchmark, in the cluster file); ``SOFTWARE_EFFICIENCY``
is the one constant fitted, once, to one reference point (below). A link is the node's when the whole group
sits in one node (axes are laid out data, pipe, fsdp, model from the outside in), else the inter-node one.
"""
from __future__ import annotations

import dataclasses

from jdist.analysis.plan._cluster import Cluster
from jdist.analysis.plan._costs import Costs
from jdist.analysis.plan._layout import Layout

# The fraction of a chip's measured matmul rate that a whole training step's arithmetic reaches, calibrated once
# (benchmarks/plan_validation.py --calibrate) on one reference point: jdist's 1B GPT (d 2048, 16 layers, seq 2048,
# batch 8, bf16, cuDNN attention, no remat, blocks unrolled) on one H200, 172.7 ms per step (benchmarks/RESULTS.md,
# run 3). Every other prediction, on every cluster, uses this same number.
SOFTWARE_EFFICIENCY = 0.767

_STEPS = {"all-reduce": lambda n: 2 * (n - 1), "all-gather": lambda n: n - 1, "reduce-scatter": lambda n: n - 1,
          "collective-permute": lambda n: 1, "all-to-all": lambda n: n - 1}


@dataclasses.dataclass(frozen=True)
class Timing:
  """Predicted seconds per step and their parts (``tensor``, ``pipe``, ``data`` are the exposed parts)."""

  step: float
  compute: float
  tensor: float
  pipe: float
  data: float  # exposed data / FSDP collectives
  data_total: float  # all of them, hidden or not
  bubble: float
  mfu: float

  @property
  def comm_share(self) -> float:
    return (self.tensor + self.pipe + self.data) / self.step

  @property
  def bubble_share(self) -> float:
    return self.bubble / self.step


def collective_seconds(costs: Costs, layout: Layout, cluster: Cluster, axis: str) -> float:
  """Alpha-beta time of ``axis``' collectives: ring steps x latency + bytes sent / the link's bandwidth."""
  total = 0.0
  for c in costs.collectives:
    if c.axis != axis:
      continue
    n = getattr(layout, axis)
    link = cluster.link(2 if axis == "pipe" else n, layout.stride(axis))
    total += c.count * _STEPS[c.kind](n) * link.latency + c.sent_bytes / link.bandwidth
  return total


def step_time(costs: Costs, layout: Layout, cluster: Cluster, *,
              software_efficiency: float = SOFTWARE_EFFICIENCY) -> Timing:
  """Predicted time of one step of ``layout`` on ``cluster`` for the per-device ``costs``."""
  rate = cluster.peak_flops * cluster.matmul_efficiency * software_efficiency
  compute = costs.flops / rate + costs.hbm_bytes / cluster.hbm_bandwidth
  tensor = collective_seconds(costs, layout, cluster, "model")
  pipe = collective_seconds(costs, layout, cluster, "pipe")
  fsdp = collective_seconds(costs, layout, cluster, "fsdp")
  grads = collective_seconds(costs, layout, cluster, "data")
  hidden = fsdp + (grads if layout.overlap_grad_reduce else 0.0)
  data = max(0.0, hidden - compute) + (0.0 if layout.overlap_grad_reduce else grads)
  data_total = fsdp + grads
  bubble = (layout.pipe - 1) / (layout.virtual * layout.microbatches) * (compute + tensor + pipe)
  step = compute + tensor + pipe + bubble + data
  return Timing(step=step, compute=compute, tensor=tensor, pipe=pipe, data=data, data_total=data_total, bubble=bubble,
                mfu=costs.model_flops / (step * cluster.peak_flops))
