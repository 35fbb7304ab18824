"""Collective communication: AllReduce algorithms you can read and swap.

Inside ``jax.shard_map``: ``allreduce(tree, axis_name, algorithm=..., op=...)``. Each algorithm is a
function of one flat payload in ``ALGORITHMS``, with a numpy simulation in ``REFERENCES`` (hierarchical's,
over two axes, is ``hierarchical_reference(xs, outer, inner)``). The compressed all-reduces (bf16, int8,
PowerSGD) are here too; strategies take them as reducers (``jdist.reducers``, built in ``_reducers.py``).
"""
from jdist.collectives._algorithms import ALGORITHMS as ALGORITHMS
from jdist.collectives._algorithms import halving_doubling as halving_doubling
from jdist.collectives._algorithms import hierarchical as hierarchical
from jdist.collectives._algorithms import psum as psum
from jdist.collectives._algorithms import ring as ring
from jdist.collectives._algorithms import ring_all_gather as ring_all_gather
from jdist.collectives._algorithms import ring_reduce_scatter as ring_reduce_scatter
from jdist.collectives._algorithms import tree as tree
from jdist.collectives._allreduce import DEFAULT_BUCKET_BYTES as DEFAULT_BUCKET_BYTES
from jdist.collectives._allreduce import allreduce as allreduce
from jdist.collectives._allreduce import check_algorithm as check_algorithm
from jdist.collectives._compression import bf16_allreduce as bf16_allreduce
from jdist.collectives._compression import int8_allreduce as int8_allreduce
from jdist.collectives._compression import powersgd_allreduce as powersgd_allreduce
from jdist.collectives._compression import (
           powersgd_compressible as powersgd_compressible,
)
from jdist.collectives._compression import powersgd_init as powersgd_init
from jdist.collectives._reference import REFERENCES as REFERENCES
from jdist.collectives._reference import (
           hierarchical_reference as hierarchical_reference,
)
from jdist.collectives._reference import ring_reference as ring_reference

__all__ = ["ALGORITHMS", "bf16_allreduce", "int8_allreduce", "powersgd_allreduce",
           "powersgd_compressible", "powersgd_init", "DEFAULT_BUCKET_BYTES", "REFERENCES",
           "allreduce", "check_algorithm", "halving_doubling", "hierarchical",
           "hierarchical_reference", "psum", "ring", "ring_all_gather", "ring_reduce_scatter", "ring_reference",
           "tree"]
