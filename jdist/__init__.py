"""jdist: distributed training in JAX where every strategy computes the same mathematics.

A strategy is a factory returning pure functions (``init``, ``shard_batch``, ``step``), like an optax
``GradientTransformation``. See README.md and docs/pitfalls.md.
"""
from jdist import analysis as analysis
from jdist import batches as batches
from jdist import collectives as collectives
from jdist import data as data
from jdist import distributed as distributed
from jdist import errors as errors
from jdist import models as models
from jdist import precision as precision
from jdist import reducers as reducers
from jdist import strategies as strategies
from jdist import train as train
from jdist.analysis import comm_report as comm_report
from jdist.analysis import theory as theory
from jdist.analysis.plan import plan as plan
from jdist.analysis.perf import mfu as mfu
from jdist.batches import put_batch as put_batch
from jdist.batches import shard_batch as shard_batch
from jdist.mesh import emulate_devices as emulate_devices
from jdist.mesh import make_mesh as make_mesh
from jdist.mesh import replicate as replicate
from jdist.state import TrainState as TrainState
from jdist.strategies import model_parallel as model_parallel
from jdist.strategies.async_sgd import async_sgd as async_sgd
from jdist.strategies.async_sgd import split_workers as split_workers
from jdist.strategies.data_parallel import data_parallel as data_parallel
from jdist.strategies.local_sgd import local_sgd as local_sgd
from jdist.strategies.model_parallel import explain_sharding as explain_sharding
from jdist.strategies.model_parallel import partition_specs as partition_specs
from jdist.strategies.model_parallel import rules_from_flax as rules_from_flax
from jdist.strategies.model_parallel import sharded as sharded
from jdist.strategies.pipeline import pipeline as pipeline
from jdist.strategies.pipeline import pipeline_schedule as pipeline_schedule
from jdist.strategy import Strategy as Strategy
from jdist.strategy import scan_steps as scan_steps
from jdist.strategy import shard_key as shard_key
from jdist.strategy import takes_key as takes_key
from jdist.train import CheckpointConfig as CheckpointConfig
from jdist.train import fit as fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "Strategy",
    "TrainState",
    "analysis",
    "async_sgd",
    "batches",
    "collectives",
    "comm_report",
    "data",
    "data_parallel",
    "distributed",
    "emulate_devices",
    "errors",
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
    "plan",
    "precision",
    "put_batch",
    "reducers",
    "replicate",
    "rules_from_flax",
    "scan_steps",
    "shard_batch",
    "sharded",
    "shard_key",
    "split_workers",
    "strategies",
    "takes_key",
    "theory",
    "train",
]
