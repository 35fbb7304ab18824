"""Asynchronous SGD on an emulated parameter server (see ``_strategy``'s docstring)."""
from jdist.strategies.async_sgd._strategy import (
  DelayModel as DelayModel,
  async_sgd as async_sgd,
  every_tick as every_tick,
  fixed_speeds as fixed_speeds,
  geometric as geometric,
  split_workers as split_workers,
  uniform as uniform,
)
