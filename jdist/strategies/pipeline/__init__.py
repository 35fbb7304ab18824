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
- ``1f1b`` (PipeDream-Flush, Megatron's non-interleaved one-forward-one-backward): one ``lax.scan`` over
  2(m + p - 1) ticks runs forwards and backwards together, the backward written by hand
  (``_one_f_one_b``). Same bubble as GPipe; device d holds min(p - d, m) stage inputs instead of GPipe's
  m micro-batches of every layer's activations, so its memory does not grow with m. The cost: each
  stage's forward runs twice (about 4 instead of 3 forward-equivalents of compute per micro-batch), and
  on devices running in parallel a tick lasts as long as its slowest op, a backward.

Modules: ``_schedules`` (the ``Schedule`` tables, numpy only), ``_layout`` (where the stacked layers
live), ``_stage`` (the frozen ``PipelineConfig`` and per-device pieces), ``_gpipe`` and ``_one_f_one_b``
(the executors), ``_pipeline`` (the factory).
"""
from jdist.strategies.pipeline._layout import device_layer_order as device_layer_order
from jdist.strategies.pipeline._layout import unstack_params as unstack_params
from jdist.strategies.pipeline._pipeline import pipeline as pipeline
from jdist.strategies.pipeline._schedules import SCHEDULES as SCHEDULES
from jdist.strategies.pipeline._schedules import Schedule as Schedule
from jdist.strategies.pipeline._schedules import pipeline_schedule as pipeline_schedule

__all__ = ["SCHEDULES", "Schedule", "device_layer_order", "pipeline", "pipeline_schedule", "unstack_params"]
