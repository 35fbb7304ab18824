"""Small reference models used by the examples, tests and benchmarks.

Each model is a set of pure functions over a dict of parameters: ``init(key, ...) -> params``,
``apply(params, x) -> y`` and a ``loss(params, batch)`` that is the mean over the batch's examples.
``Model`` (and ``Pipelined``) is what a model callable named in a config's ``[model]`` returns.
"""
from jdist.models import gpt as gpt
from jdist.models import linear as linear
from jdist.models import mlp as mlp
from jdist.models import resmlp as resmlp
from jdist.models._model import Model as Model
from jdist.models._model import Pipelined as Pipelined

__all__ = ["Model", "Pipelined", "gpt", "linear", "mlp", "resmlp"]
