"""The training state that every strategy carries from step to step."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jdist._types import Params, PRNGKey, PyTree


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step reads and writes: a step is a pure function of (state, batch).

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: the model parameters (any pytree of arrays).
    opt_state: the optax optimizer state.
    key: a JAX PRNG key (uint32[2] raw key data), split by strategies that need randomness.
    extra: strategy-specific state (e.g. the async emulator's stale worker copies); None if unused.
  """

  step: jax.Array
  params: Params
  opt_state: PyTree
  key: PRNGKey
  extra: Any = None

  def replace(self, **changes: Any) -> "TrainState":
    return dataclasses.replace(self, **changes)
