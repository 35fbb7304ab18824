"""A layout: how many devices on each mesh axis, micro-batches, recomputation; and the candidates for a model."""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from jdist.analysis.plan._shape import TransformerShape
from jdist.errors import OptionError

REMATS = ("none", "dots_saveable", "selective", "full")  # jdist's GPT has the first, second and last
STRATEGIES = ("data_parallel", "sharded", "pipeline", "analytic")  # "analytic": no jdist strategy runs it
# mesh axes from the outermost (slowest varying device id) to the innermost: tensor parallelism, the most
# talkative, stays inside a node; data parallelism, once a step, goes across nodes
AXIS_ORDER = ("data", "pipe", "fsdp", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
  """Degrees of parallelism and how a step is cut.

  ``data`` x ``fsdp`` x ``model`` (tensor) x ``pipe`` devices. The global batch is split over data and fsdp; each
  of those groups runs it in ``microbatches`` pieces (gradient accumulation, or a pipeline's micro-batches).
  """

  strategy: str = "analytic"  # which jdist strategy runs it (STRATEGIES)
  data: int = 1
  fsdp: int = 1
  model: int = 1  # tensor parallel
  pipe: int = 1
  microbatches: int = 1
  remat: str = "none"  # REMATS
  virtual: int = 1  # interleaved pipeline stages per device (Megatron's interleaved 1F1B)
  sequence_parallel: bool = False  # norms and residuals split over the tensor axis too (Megatron-SP)
  overlap_grad_reduce: bool = True  # the data axis' gradient all-reduce runs under the backward pass

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise OptionError("Layout.strategy", self.strategy, f"one of {list(STRATEGIES)}")
    if self.remat not in REMATS:
      raise OptionError("Layout.remat", self.remat, f"one of {list(REMATS)}")
    for name in ("data", "fsdp", "model", "pipe", "microbatches", "virtual"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise OptionError(f"Layout.{name}", getattr(self, name), "a positive int")

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.model * self.pipe

  def axes(self) -> dict[str, int]:
    """The mesh axes of more than one device, outermost first."""
    return {a: getattr(self, a) for a in AXIS_ORDER if getattr(self, a) > 1}

  def stride(self, axis: str) -> int:
    """Distance in device order between neighbours on ``axis`` (the product of the inner axes)."""
    return math.prod(getattr(self, a) for a in AXIS_ORDER[AXIS_ORDER.index(axis) + 1:])

  def label(self) -> str:
    parts = [f"{a}={getattr(self, a)}" for a in AXIS_ORDER if getattr(self, a) > 1] or ["1 device"]
    extra = [f"mb={self.microbatches}"] if self.microbatches > 1 else []
    extra += [f"v={self.virtual}"] if self.virtual > 1 else []
    extra += [f"remat={self.remat}"] if self.remat != "none" else []
    return " ".join(parts + extra)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(shape: TransformerShape, devices: int, batch: int, *, remats=("none", "dots_saveable", "full"),
               max_microbatches: int = 16) -> Iterator[Layout]:
  """The layouts jdist can run for ``shape`` on ``devices``: data parallel with gradient accumulation, GSPMD
  ``sharded`` over data x fsdp x model, and data x pipe pipelines (1F1B), each with every remat policy. jdist
  reduces the gradients over the data axis after the backward pass: no overlap is assumed for it.

  Mesh degrees divide the devices; the model axis divides the heads (Megatron's split by heads) and the MLP
  width; the pipe axis divides the layers; the batch divides by data x fsdp x micro-batches.
  """
  for remat in remats:
    for m in _divisors(batch):
      if m > max_microbatches:
        break
      if batch % (devices * m) == 0:
        yield Layout(strategy="data_parallel", data=devices, microbatches=m, remat=remat, overlap_grad_reduce=False)
    for model in _divisors(devices):
      if shape.n_heads % model or shape.d_ff % model:
        continue
      for fsdp in _divisors(devices // model):
        data = devices // (model * fsdp)
        if batch % (data * fsdp) or (model == 1 and fsdp == 1):  # plain data parallelism is the row above
          continue
        yield Layout(strategy="sharded", data=data, fsdp=fsdp, model=model, remat=remat, overlap_grad_reduce=False)
    for pipe in _divisors(devices)[1:]:
      data = devices // pipe
      if shape.n_layers % pipe:
        continue
      for m in _divisors(batch // data if batch % data == 0 else 1):
        if pipe <= m <= max_microbatches * pipe // 2 and batch % (data * m) == 0:
          yield Layout(strategy="pipeline", data=data, pipe=pipe, microbatches=m, remat=remat,
                       overlap_grad_reduce=False)
