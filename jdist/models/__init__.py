"""Small reference models used by the examples, tests and benchmarks.

Each model is a set of pure functions over a dict of parameters: ``init(key, ...) -> params``,
``apply(params, x) -> y`` and a ``loss(params, batch)`` that is the mean over the batch's examples.
"""
from jdist.models import gpt as gpt
from jdist.models import linear as linear
from jdist.models import mlp as mlp
from jdist.models import resmlp as resmlp

__all__ = ["gpt", "linear", "mlp", "resmlp"]
