"""What every pipeline executor shares: its frozen config, and the per-device pieces (run inside ``shard_map``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jdist._checks import check_callable
from jdist._types import Batch, Params
from jdist.errors import BatchError
from jdist.strategies.pipeline._schedules import Schedule
from jdist.strategy import KeyedLoss, loss_and_aux, shard_key


def batch_x(params: Params, batch: Batch) -> jax.Array:
  """The default ``input_fn``: the batch's "x"."""
  if not (isinstance(batch, Mapping) and "x" in batch):
    keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise BatchError(f"The default input_fn reads batch['x'], but the batch has {keys}. Pass "
                     f"input_fn=lambda params, batch: ... to make the first stage's input.", {})
  return batch["x"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
  """What a pipeline step needs, fixed when the strategy is built (``pipeline``'s arguments, checked)."""

  # one layer: (layer params, x [mb, ...]) -> x, same type; takes_key(fn): (layer params, x, key) -> x
  stage_fn: Callable[..., jax.Array]
  # (params, y [mb, ...], micro-batch) -> scalar mean loss, or (loss, aux); takes_key(fn): also a key
  loss_fn: Callable[..., Any]
  input_fn: Callable[[Params, Batch], jax.Array] = batch_x  # (params, micro-batch) -> x [mb, ...]
  has_aux: bool = False  # loss_fn returns (loss, aux)
  axis: str = "pipe"  # the mesh axis the layers are split over; its size is schedule.num_stages
  data_axes: tuple[str, ...] = ()  # mesh axes the batch is split over (data replicas); never axis
  schedule: Schedule  # the table the step runs: p devices, m micro-batches, v virtual stages
  remat: Callable[..., Any] | None = None  # a jax.checkpoint policy: what each layer keeps for its backward

  def __post_init__(self):
    for name in ("stage_fn", "loss_fn", "input_fn"):
      check_callable(getattr(self, name), name)
    if self.remat is not None:
      check_callable(self.remat, "remat")

  @property
  def takes_key(self) -> bool:
    """The stage or the loss draws random numbers (``jdist.takes_key``): the step needs ``state.key``."""
    return isinstance(self.stage_fn, KeyedLoss) or isinstance(self.loss_fn, KeyedLoss)

  def layer(self, layer: Params, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """One layer on x; a ``takes_key`` stage gets ``key`` (that of the layer and micro-batch, ``layer_key``)."""
    return self.stage_fn.fn(layer, x, key) if isinstance(self.stage_fn, KeyedLoss) else self.stage_fn(layer, x)

  def micro_key(self, base: tuple[jax.Array, jax.Array] | None, i: jax.Array) -> jax.Array | None:
    """Micro-batch i's key: ``shard_key(state.key, state.step, r m + i)`` on data replica r (the micro-batches
    numbered in global batch order); None without a ``takes_key`` function. ``base``: (key data, step)."""
    if base is None:
      return None
    replica = jax.lax.axis_index(self.data_axes) if self.data_axes else 0
    return shard_key(*base, replica * self.schedule.microbatches + jnp.maximum(i, 0))

  @property
  def all_axes(self) -> tuple[str, ...]:
    return (self.axis, *self.data_axes)

  @property
  def batch_spec(self) -> P:
    """The batch split over the data axes on its leading (example) axis; replicated without them."""
    return P(self.data_axes) if self.data_axes else P()

  def varying(self, x: jax.Array) -> jax.Array:
    """``x`` typed like the values the pipeline computes (varying over every mesh axis), for cond / scan."""
    missing = tuple(a for a in self.all_axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  def head(self, params: Params, y: jax.Array, micro_batch: Batch, key: jax.Array | None = None
           ) -> tuple[jax.Array, Any]:
    """The loss of one micro-batch from the last layer's output: ``(scalar loss, aux or None)``; a
    ``takes_key`` loss gets the micro-batch's key."""
    if isinstance(self.loss_fn, KeyedLoss):
      return loss_and_aux(self.loss_fn.fn(params, y, micro_batch, key), self.has_aux)
    return loss_and_aux(self.loss_fn(params, y, micro_batch), self.has_aux)


def vary_params(cfg: PipelineConfig, params: Params) -> Params:
  """Inside ``shard_map``: every entry typed as varying over every mesh axis (the stacked layers already
  vary over the pipe axis), as the values the pipeline computes from them."""
  vary = lambda x, axes: jax.lax.pcast(x, axes, to="varying") if axes else x
  return {k: jax.tree.map(lambda x: vary(x, cfg.data_axes if k == "stages" else cfg.all_axes), val)
          for k, val in params.items()}


def layer_key(key: jax.Array | None, layer: jax.Array | int) -> jax.Array | None:
  """The key of model layer ``layer`` (its index in model order) for a micro-batch's ``key``: fold_in."""
  return None if key is None else jax.random.fold_in(key, layer)


def micro_batches(batch: Batch, m: int) -> Callable[[jax.Array], Batch]:
  """``pick(i)``: micro-batch i (a traced index; negative ones read micro-batch 0) of this device's batch."""
  micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)
  return lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, jnp.maximum(i, 0), 0, keepdims=False),
                                micro)


def run_stage(cfg: PipelineConfig, local: Params, lap: jax.Array | int, x: jax.Array, key: jax.Array | None = None,
              first_layer: jax.Array | int = 0, unroll: bool = False) -> jax.Array:
  """Runs virtual stage ``lap`` of this device's layers ``local`` [v c, ...] (its c layers in order) on x;
  with a micro-batch ``key``, layer k of the stage gets ``layer_key(key, first_layer + k)``.

  One ``dynamic_slice`` per leaf, no squeeze after it: ``_gpipe.weights_only`` recomputes the selection
  in the backward as a single weight-only op instead of keeping it per tick.
  """
  v = cfg.schedule.repeats
  layers = local if v == 1 else jax.tree.map(
      lambda a: jax.lax.dynamic_slice_in_dim(a, lap * (a.shape[0] // v), a.shape[0] // v, 0), local)
  c = jax.tree.leaves(layers)[0].shape[0]
  step = lambda h, layer_k: (cfg.layer(layer_k[0], h, layer_key(key, first_layer + layer_k[1])), None)
  return jax.lax.scan(step, x, (layers, jnp.arange(c)), unroll=unroll)[0]


def activation_type(cfg: PipelineConfig, params: Params, micro_batch: Batch) -> jax.ShapeDtypeStruct:
  """The activations' type after ``input_fn`` (traced, not run), checked to be one array that ``stage_fn``
  returns unchanged in shape and dtype: each stage's output is the next one's input."""
  x = jax.eval_shape(lambda: cfg.input_fn(params, micro_batch))
  y = None
  if isinstance(x, jax.ShapeDtypeStruct):
    layer = jax.tree.map(lambda a: a[0], params["stages"])  # this device's first layer
    key = jax.random.key(0) if isinstance(cfg.stage_fn, KeyedLoss) else None
    y = jax.eval_shape(lambda: cfg.layer(layer, jnp.zeros(x.shape, x.dtype), key))
  if not isinstance(y, jax.ShapeDtypeStruct) or (y.shape, y.dtype) != (x.shape, x.dtype):
    show = lambda a: f"{a.dtype}{list(a.shape)}" if isinstance(a, jax.ShapeDtypeStruct) else str(jax.tree.structure(a))
    raise TypeError(f"The activations must be one array that stage_fn returns in the shape and dtype it was given "
                    f"(each stage's output is the next one's input): input_fn returned {show(x)}, stage_fn "
                    f"{'-' if y is None else show(y)}. Pack several arrays into one in input_fn, and change the "
                    f"width or dtype in input_fn or loss_fn, not in stage_fn.")
  return x


def zero_sums(tree_type: Any, cfg: PipelineConfig) -> Any:
  """Zeros to sum values typed like ``tree_type`` into (float32 or wider), varying over every mesh axis."""
  return jax.tree.map(lambda a: cfg.varying(jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32))), tree_type)


def add_sums(sums: Any, values: Any) -> Any:
  return jax.tree.map(lambda acc, a: acc + a.astype(acc.dtype), sums, values)
