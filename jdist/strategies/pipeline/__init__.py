"""Pipeline parallelism: layers on different devices, micro-batches flowing through them."""
from jdist.strategies.pipeline._pipeline import Schedule as Schedule
from jdist.strategies.pipeline._pipeline import device_layer_order as device_layer_order
from jdist.strategies.pipeline._pipeline import pipeline as pipeline
from jdist.strategies.pipeline._pipeline import pipeline_schedule as pipeline_schedule
from jdist.strategies.pipeline._pipeline import unstack_params as unstack_params

__all__ = ["Schedule", "device_layer_order", "pipeline", "pipeline_schedule", "unstack_params"]
