"""Pipeline parallelism: layers on different devices, micro-batches flowing through them.

The model is a stack of identical stages (per-layer parameters stacked on a leading axis, as
``jdist.models.gpt`` keeps its blocks) plus an input function before the first stage and a loss after
the last. Inside ``jax.shard_map`` over the ``pipe`` axis each device holds some of the layers; every
tick each device runs its stage on one micro-batch and hands the activations to the next device with
``ppermute``.

Schedules (p devices on the pipe axis, m micro-batches, S stacked layers), tables built in numpy by
``_schedules`` and shown by ``pipeline_schedule``:

- ``gpipe``: device d holds layers [d S/p, (d+1) S/p). Micro-batch i is on device d at tick i + d.
  m + p - 1 ticks; bubble (idle stage-ticks / all) = (p-1)/(m+p-1). ``jax.grad`` of the tick loop runs
  it backwards (the reverse ``ppermute`` carries the activation gradients) and accumulates the gradients
  of every micro-batch (``_gpipe``).
- ``circular`` (interleaved): the layers are cut into p v virtual stages of S/(p v) layers; virtual stage
  j lives on device j mod p, so a micro-batch goes round the ring of devices v times. Micro-batches enter
  in groups of p. m v + p - 1 ticks for m a multiple of p; bubble (p-1)/(m v + p - 1), about v times less.
- ``1f1b`` (PipeDream-Flush, Megatron's non-interleaved one-forward-one-backward) and the rest of its family
  run forwards and backwards in one ``lax.scan`` over the table's ticks, the backward written by hand
  (``_ticks``): device d holds min(p - d, m) micro-batches instead of GPipe's m, whatever m. Each layer's VJP
  is taken apart at trace time (``_residuals``): a forward stashes what its backward reads that depends on
  the activations (or what ``remat``, a ``jax.checkpoint`` policy, keeps), never the weights, so no forward
  runs twice by default.
- ``interleaved_1f1b`` (Megatron's interleaved schedule): v virtual stages per device, round-robin; bubble
  (p-1)/(m v + p - 1) for p | m; device d holds (v-1) p + 2(p-1-d) + 1 virtual-stage inputs (11 9 7 5
  for p=4, m=8, v=2, as torch's ``ScheduleInterleaved1F1B``).
- ``zb_h1`` (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): each backward split into B (the
  input gradient) and W (the weight gradient), the W delayed to fill the drain: bubble (p-1)/(3 m + p - 1),
  a third of 1F1B's in time, at 1F1B's peak (p micro-batches). v > 1: torch's interleaved zero bubble.
- ``zbv`` (ZB-V): two virtual stages per device in a V (device d holds stages d and 2p-1-d), split
  backward: bubble (p-1)/(6 m + p - 1) for m >= 2p - 1 at 1F1B's activation memory.

Every table's per-device order equals torch 2.13's (``benchmarks/pipeline_torch.py``). ``modelled_time``
gives a table's step time from its ops' costs (``op_flops``: each op compiled alone), in lockstep as jdist
runs it or asynchronously as the papers model it.

Modules: ``_schedules`` and ``_orders`` (the ``Schedule`` tables, numpy only), ``_layout`` (where the
stacked layers live), ``_stage`` (the frozen ``PipelineConfig`` and per-device pieces), ``_residuals`` (a
layer's VJP taken apart), ``_gpipe`` and ``_ticks`` (the executors), ``_cost`` (FLOPs and modelled time),
``_pipeline`` (the factory).
"""
from jdist.strategies.pipeline._cost import modelled_time as modelled_time
from jdist.strategies.pipeline._cost import op_flops as op_flops
from jdist.strategies.pipeline._cost import step_flops as step_flops
from jdist.strategies.pipeline._layout import device_layer_order as device_layer_order
from jdist.strategies.pipeline._layout import unstack_params as unstack_params
from jdist.strategies.pipeline._pipeline import pipeline as pipeline
from jdist.strategies.pipeline._schedules import SCHEDULES as SCHEDULES
from jdist.strategies.pipeline._schedules import Schedule as Schedule
from jdist.strategies.pipeline._schedules import pipeline_schedule as pipeline_schedule

__all__ = ["SCHEDULES", "Schedule", "device_layer_order", "modelled_time", "op_flops", "pipeline", "pipeline_schedule",
           "step_flops", "unstack_params"]
