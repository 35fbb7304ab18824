"""How gradients are averaged, as values: ``jdist.reducers.mean("ring")``, ``bf16()``, ``int8()``, ``powersgd(4)``,
or your own ``Reducer(init, reduce)``; every averaging strategy takes one as ``reducer=`` (see
``jdist.collectives._reducers`` for the contract)."""
from jdist.collectives._reducers import Reducer as Reducer
from jdist.collectives._reducers import ReducerState as ReducerState
from jdist.collectives._reducers import bf16 as bf16
from jdist.collectives._reducers import int8 as int8
from jdist.collectives._reducers import mean as mean
from jdist.collectives._reducers import powersgd as powersgd
from jdist.collectives._reducers import residual_zeros as residual_zeros

__all__ = ["Reducer", "ReducerState", "bf16", "int8", "mean", "powersgd", "residual_zeros"]
