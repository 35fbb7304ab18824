"""Where the pipeline keeps its parameters: the stacked layers split over the pipe devices, in device order."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist._types import Params
from jdist.errors import OptionTypeError
from jdist.strategies.pipeline._schedules import Schedule


def check_stages(params: Any, p: int, v: int) -> int:
  """Returns S, the number of stacked layers in ``params["stages"]``, after checking the structure.

  Raises:
    ValueError: ``params`` is not a dict with a ``"stages"`` entry whose leaves share a leading (layer)
      size, or that size does not split into p devices x v virtual stages.
  """
  stages = params.get("stages") if isinstance(params, dict) else None
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stages)}
  if len(sizes) != 1 or None in sizes:
    got = f"leading sizes {sorted(map(str, sizes))}" if stages is not None else (
        f"{type(params).__name__} with keys {list(params) if isinstance(params, dict) else '-'}")
    raise ValueError(f"pipeline params must be a dict with a 'stages' entry holding the stacked per-layer "
                     f"parameters, every leaf with the same leading (layer) size; got {got}. Stack per-layer "
                     f"parameters with jax.tree.map(lambda *x: jnp.stack(x), *layers).")
  (s,) = sizes
  if s % (p * v):
    raise ValueError(f"{s} stacked layers cannot be split into {p} pipeline devices x {v} virtual stages "
                     f"(= {p * v}); use a number of layers divisible by {p * v} or another mesh / repeats.")
  return s


def device_layer_order(num_layers: int, num_stages: int, repeats: int, stages: np.ndarray | None = None
                       ) -> np.ndarray:
  """``order[k]``: the layer the pipeline state keeps at position k of its layer axis.

  Device d holds positions [d S/p, (d+1) S/p): its v virtual stages of c = S/(p v) layers in lap order,
  virtual stage j of the model (layers [j c, (j+1) c)) where ``stages`` (int[p, v], a schedule's
  ``stage_ids``) puts it; by default on device j mod p, lap j // p (round-robin). With v = 1 (GPipe,
  1F1B, ZB-H1) that is the identity.
  """
  p, v = num_stages, repeats
  c = num_layers // (p * v)
  stages = np.arange(p * v).reshape(v, p).T if stages is None else np.asarray(stages)
  return (stages[:, :, None] * c + np.arange(c)).reshape(-1)


def to_device_order(params: Params, schedule: Schedule) -> Params:
  """``params`` with the stacked layers in device order (``device_layer_order``): what the state keeps."""
  if schedule.repeats == 1:
    return params
  order = device_layer_order(jax.tree.leaves(params["stages"])[0].shape[0], schedule.num_stages, schedule.repeats,
                             schedule.stage_ids)
  return dict(params, stages=jax.tree.map(lambda x: x[order], params["stages"]))


def unstack_params(params: Params, schedule: Schedule) -> Params:
  """Pipeline params (or a tree laid out like them: gradients, optimizer moments) in the model's layer
  order; ``schedule`` is the strategy's, ``strategy.info["schedule"]``. Only schedules with virtual stages
  reorder the layers (``device_layer_order``); the shapes are the model's in every schedule."""
  if not isinstance(schedule, Schedule):
    raise OptionTypeError("schedule", schedule, "the pipeline's Schedule", "Pass strategy.info['schedule'].")
  if schedule.repeats == 1:
    return params
  order = device_layer_order(jax.tree.leaves(params["stages"])[0].shape[0], schedule.num_stages, schedule.repeats,
                             schedule.stage_ids)
  return dict(params, stages=jax.tree.map(lambda x: x[np.argsort(order)], params["stages"]))


def param_specs(params: Params, axis: str) -> dict[str, Any]:
  """The stacked layers [S, ...] split over the pipe axis on their leading axis; everything else replicated."""
  return {k: jax.tree.map(lambda _: P(axis) if k == "stages" else P(), val) for k, val in params.items()}


def param_shardings(params: Params, axis: str, mesh: Mesh) -> dict[str, Any]:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, axis), is_leaf=lambda x: isinstance(x, P))
