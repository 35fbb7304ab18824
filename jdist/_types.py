"""Type aliases used across jdist, kept in one place."""
from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any
Params = PyTree  # any pytree of arrays: a dict, flax NNX state, linen variables
Batch = PyTree  # a pytree of arrays whose leaves share the leading (example) axis
PRNGKey = jax.Array
Metrics = dict[str, Any]
LossFn = Callable[..., Any]  # loss_fn(params, batch) -> scalar, or (scalar, aux) with has_aux
