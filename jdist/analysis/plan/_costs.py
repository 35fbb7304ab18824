"""What one device does in one step of a layout, by the textbook: FLOPs, memory traffic, collective bytes, memory.

Counts are per device and per optimizer step, for the busiest device (the last pipeline stage, which also runs
the head). Collective byte counts are those of the bandwidth-optimal algorithms (``jdist.theory``): a ring
all-reduce sends 2(n-1)/n of its payload, an all-gather or reduce-scatter (n-1)/n of the full array.
"""
from __future__ import annotations

import dataclasses

from jdist.analysis.plan._layout import Layout
from jdist.analysis.plan._shape import TransformerShape
from jdist.errors import OptionError

OPTIMIZER_STATE_BYTES = 8  # Adam's two fp32 moments per parameter
GRAD_BYTES = 4  # gradients are reduced in fp32
OPTIMIZER_TRAFFIC = 34  # HBM bytes per local parameter per step: Adam reads p, g, m, v (16), writes p, m, v (12),
#                         and the step casts the weights to the compute dtype (read 4, write 2)
LOGIT_PASSES = 5  # fp32 logits written, read by log-sum-exp and the target pick, their gradient written and read
ATTENTION_PASSES = 12  # accesses per (query, key, head) element of materialised scores: 4 forward, 8 backward
ELEMENTWISE_REPLICATED = 10  # forward accesses per token, in units of D: two norms (2 each), two residual adds (3)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One kind of collective on one mesh axis: how many per step, payload of each, bytes a device sends in all."""

  axis: str
  kind: str  # "all-reduce", "all-gather", "reduce-scatter", "collective-permute"
  count: int
  payload_bytes: float
  sent_bytes: float


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per device per step. ``flops``: arithmetic done (recomputation included); ``model_flops``: the model's
  (MFU numerator, this device's share); ``hbm_bytes``: memory traffic of everything that is not a matmul."""

  flops: float
  model_flops: float
  hbm_bytes: float
  collectives: tuple[Collective, ...]
  param_bytes: float  # parameters held by the device
  optimizer_bytes: float  # optimizer state held by the device
  other_bytes: float  # gradients, activations kept for the backward pass, logits, temporaries
  source: str = "textbook"

  @property
  def memory_bytes(self) -> float:
    return self.param_bytes + self.optimizer_bytes + self.other_bytes

  def sent_bytes(self, axis: str | None = None) -> float:
    return sum(c.sent_bytes for c in self.collectives if axis is None or c.axis == axis)


def _check(shape: TransformerShape, layout: Layout, batch: int) -> None:
  groups = layout.data * layout.fsdp * layout.microbatches
  if batch % groups:
    raise OptionError("batch", batch, f"a multiple of data x fsdp x microbatches = {groups}")
  if shape.n_layers % (layout.pipe * layout.virtual):
    raise OptionError("Layout.pipe", layout.pipe,
                      f"a divisor of the layers ({shape.n_layers}) with virtual={layout.virtual}")


def _recomputes_forward(layout: Layout) -> bool:
  """Full remat, or jdist's 1F1B pipeline, which stashes stage inputs only and runs each stage again in its
  backward (issue 21)."""
  return layout.remat == "full" or layout.strategy == "pipeline"


def _layer_flops(shape: TransformerShape, layout: Layout) -> float:
  """Hardware FLOPs per token of one layer on one tensor rank, forward and backward, with recomputation."""
  t = layout.model
  fwd, attention = shape.layer_flops_fwd() / t, shape.attention_flops_fwd() / t
  if _recomputes_forward(layout):
    return 4 * fwd
  recompute_attention = layout.remat == "selective" or (layout.remat == "dots_saveable" and not shape.flash_attention)
  return 3 * fwd + (attention if recompute_attention else 0.0)


def _stage_params(shape: TransformerShape, layout: Layout) -> float:
  """Parameters of the busiest stage on one tensor rank, before FSDP splits them."""
  t = layout.model
  layers = shape.n_layers // layout.pipe
  embedding = shape.embedding_params() / (t if shape.vocab_parallel else 1)
  return layers * (shape.layer_matmul_params() / t + 2 * shape.d_model) + embedding


def _hbm_bytes(shape: TransformerShape, layout: Layout, tokens: float, local_params: float) -> float:
  """Memory traffic of the non-matmul work: elementwise ops (fused as a GPU or TPU compiler fuses them),
  materialised attention scores, fp32 logits, the optimizer update."""
  t, d = layout.model, shape.d_model
  per_token = ELEMENTWISE_REPLICATED * d / (t if layout.sequence_parallel else 1)
  per_token += (3 if shape.gated_mlp else 2) * shape.d_ff / t
  passes = 4 if _recomputes_forward(layout) or layout.remat == "dots_saveable" else 3  # fwd, bwd (2x), recomputed
  elementwise = passes * per_token * shape.act_bytes
  attention = 0.0
  if not shape.flash_attention:
    accesses = ATTENTION_PASSES + (4 if layout.remat != "none" else 0)
    attention = accesses * shape.act_bytes * shape.n_heads / t * shape.seq_len
  layers = shape.n_layers // layout.pipe
  logits = LOGIT_PASSES * 4 * shape.vocab_size / (t if shape.vocab_parallel else 1)
  return tokens * (layers * (elementwise + attention) + logits) + OPTIMIZER_TRAFFIC * local_params


def _activation_bytes(shape: TransformerShape, layout: Layout, micro_tokens: float) -> float:
  """Activations kept for the backward pass (Korthikanti et al. 2022, eq. 2-6, bytes per token of one layer in
  units of D: 34 + 5 a s / D; split by the tensor axis as there), times the micro-batches in flight."""
  t, d = layout.model, shape.d_model
  scores = 0.0 if shape.flash_attention else 5 * shape.n_heads * shape.seq_len / d / t
  if _recomputes_forward(layout):
    per_token = 2.0  # the layer's input only
  else:
    rest = 34 / t if layout.sequence_parallel else 10 + 24 / t
    per_token = rest + (0.0 if layout.remat in ("selective", "dots_saveable") else scores)
  layers = shape.n_layers // layout.pipe
  in_flight = layout.pipe  # 1F1B: the first stage holds p micro-batches (one without a pipeline)
  return in_flight * layers * micro_tokens * per_token * d


def _collectives(shape: TransformerShape, layout: Layout, micro_tokens: float, stage_params: float):
  d, t, f, n, m = layout.data, layout.model, layout.fsdp, layout.pipe, layout.microbatches
  act = micro_tokens * shape.d_model * shape.act_bytes  # one micro-batch's activations [b, S, D]
  layers = shape.n_layers // layout.pipe
  out = []
  if t > 1:  # Megatron: one all-reduce after attention and one after the MLP, forward and backward
    per_layer = 6 if _recomputes_forward(layout) else 4
    count = per_layer * layers * m
    out.append(Collective("model", "all-reduce", count, act, count * 2 * (t - 1) / t * act))
  if f > 1:  # ZeRO-3: gather the weights for the forward and again for the backward, reduce-scatter the gradients
    full = stage_params * shape.param_bytes
    out.append(Collective("fsdp", "all-gather", 2 * m, full, 2 * m * (f - 1) / f * full))
    grads = stage_params * GRAD_BYTES
    out.append(Collective("fsdp", "reduce-scatter", m, grads, m * (f - 1) / f * grads))
  if d > 1:
    grads = stage_params / f * GRAD_BYTES
    out.append(Collective("data", "all-reduce", 1, grads, 2 * (d - 1) / d * grads))
  if n > 1:  # each micro-batch's activations forward and their gradient back, per virtual stage; a tensor group
    per = act / t  # splits the send between its ranks (Megatron's scatter / gather)
    count = 2 * m * layout.virtual
    out.append(Collective("pipe", "collective-permute", count, per, count * per))
  return tuple(out)


def textbook_costs(shape: TransformerShape, layout: Layout, batch: int) -> Costs:
  """The textbook per-device costs of one step of ``layout`` on a global batch of ``batch`` sequences."""
  _check(shape, layout, batch)
  micro = batch // (layout.data * layout.fsdp * layout.microbatches)
  micro_tokens = micro * shape.seq_len
  tokens = micro_tokens * layout.microbatches
  layers = shape.n_layers // layout.pipe
  head = shape.head_flops_fwd() / (layout.model if shape.vocab_parallel else 1)
  flops = tokens * (layers * _layer_flops(shape, layout) + 3 * head)
  model_flops = batch * shape.seq_len * shape.model_flops_per_token() / layout.devices
  stage = _stage_params(shape, layout)
  local = stage / layout.fsdp
  logits = micro_tokens * shape.vocab_size * 4 * 2 / (layout.model if shape.vocab_parallel else 1)
  other = local * GRAD_BYTES + _activation_bytes(shape, layout, micro_tokens) * shape.act_bytes / 2 + logits
  return Costs(flops=flops, model_flops=model_flops, hbm_bytes=_hbm_bytes(shape, layout, tokens, local),
               collectives=_collectives(shape, layout, micro_tokens, stage), param_bytes=local * shape.param_bytes,
               optimizer_bytes=local * OPTIMIZER_STATE_BYTES, other_bytes=other)
