"""jdist: distributed training in JAX where every strategy computes the same mathematics.

A strategy is a factory returning pure functions (``init``, ``shard_batch``, ``step``), like an optax
``GradientTransformation``. See README.md and docs/pitfalls.md.
"""
from jdist import collectives as collectives
from jdist import data as data
from jdist import distributed as distributed
from jdist import model_parallel as model_parallel
from jdist import models as models
from jdist import precision as precision
from jdist import theory as theory
from jdist import train as train
from jdist.async_sgd import async_sgd as async_sgd
from jdist.async_sgd import split_workers as split_workers
from jdist.collectives import comm_report as comm_report
from jdist.data_parallel import data_parallel as data_parallel
from jdist.local_sgd import local_sgd as local_sgd
from jdist.mesh import emulate_devices as emulate_devices
from jdist.model_parallel import explain_sharding as explain_sharding
from jdist.model_parallel import partition_specs as partition_specs
from jdist.model_parallel import sharded as sharded
from jdist.mesh import make_mesh as make_mesh
from jdist.mesh import put_batch as put_batch
from jdist.mesh import replicate as replicate
from jdist.mesh import shard_batch as shard_batch
from jdist.perf import mfu as mfu
from jdist.pipeline import pipeline as pipeline
from jdist.pipeline import pipeline_schedule as pipeline_schedule
from jdist.state import TrainState as TrainState
from jdist.strategy import Strategy as Strategy
from jdist.train import CheckpointConfig as CheckpointConfig
from jdist.train import fit as fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "Strategy",
    "TrainState",
    "async_sgd",
    "collectives",
    "comm_report",
    "data",
    "data_parallel",
    "distributed",
    "emulate_devices",
    "explain_sharding",
    "fit",
    "local_sgd",
    "make_mesh",
    "mfu",
    "model_parallel",
    "models",
    "partition_specs",
    "pipeline",
    "pipeline_schedule",
    "precision",
    "put_batch",
    "replicate",
    "shard_batch",
    "sharded",
    "split_workers",
    "theory",
    "train",
]
