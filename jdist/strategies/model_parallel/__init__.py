"""Model parallelism: sharding rules as data, the GSPMD ``sharded`` strategy, explicit TP layers."""
from jdist.strategies.model_parallel._fsdp import fsdp as fsdp
from jdist.strategies.model_parallel._rules import (
    DEFAULT_FSDP_MIN_SIZE as DEFAULT_FSDP_MIN_SIZE,
)
from jdist.strategies.model_parallel._rules import ShardingReport as ShardingReport
from jdist.strategies.model_parallel._rules import explain_sharding as explain_sharding
from jdist.strategies.model_parallel._rules import partition_specs as partition_specs
from jdist.strategies.model_parallel._rules import path_str as path_str
from jdist.strategies.model_parallel._rules import rules_from_flax as rules_from_flax
from jdist.strategies.model_parallel._sharded import sharded as sharded
from jdist.strategies.model_parallel._tp import column_parallel as column_parallel
from jdist.strategies.model_parallel._tp import row_parallel as row_parallel
from jdist.strategies.model_parallel._tp import tp_mlp as tp_mlp

__all__ = ["DEFAULT_FSDP_MIN_SIZE", "fsdp", "ShardingReport", "explain_sharding", "partition_specs", "path_str",
           "rules_from_flax", "sharded", "column_parallel", "row_parallel", "tp_mlp"]
