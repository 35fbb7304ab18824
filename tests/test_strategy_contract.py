"""The contract every strategy keeps: scan_steps equals stepping, a step takes a live TrainState, clear loss errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.models import mlp
from tests.conftest import assert_trees_all_close

PARAMS = mlp.init(jax.random.key(0), [6, 16, 3])


def _batches(steps, size):
  x = jax.random.normal(jax.random.key(1), (steps, size, 6))
  return {"x": x, "y": jnp.argmax(x[..., :3], -1)}


@pytest.mark.parametrize("make", [
    lambda: jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1)),
    lambda: jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1), backend="pmap"),
    lambda: jdist.sharded(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1), fsdp_axis="data", fsdp_min_size=1),
], ids=["data_parallel", "pmap", "fsdp"])
def test_scan_steps_equals_stepping(make):
  batches = _batches(4, 16)
  strategy = make()
  state = strategy.init(PARAMS)
  losses = []
  for t in range(4):
    state, metrics = strategy.step(state, strategy.shard_batch(jax.tree.map(lambda b: b[t], batches)))
    losses.append(float(metrics["loss"]))
  scanned, stacked = jdist.scan_steps(strategy, strategy.init(PARAMS), batches)
  assert stacked["loss"].shape == (4,)
  np.testing.assert_allclose(np.asarray(stacked["loss"]), losses, rtol=1e-6)
  assert_trees_all_close(scanned.params, state.params)
  assert int(scanned.step) == 4
  state, _ = strategy.step(scanned, strategy.shard_batch(jax.tree.map(lambda b: b[0], batches)))  # steps on


def test_scan_steps_bad_input():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=-1))
  with pytest.raises(jdist.errors.BatchError):
    jdist.scan_steps(strategy, strategy.init(PARAMS), {"x": np.zeros((2, 8, 6)), "y": np.zeros((3, 8), int)})
  with pytest.raises(jdist.errors.OptionTypeError):
    jdist.scan_steps(strategy.step, None, _batches(2, 8))


def test_a_step_refuses_params_and_a_donated_state():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=-1))
  batch = strategy.shard_batch(jax.tree.map(lambda b: b[0], _batches(1, 8)))
  with pytest.raises(jdist.errors.OptionTypeError, match="TrainState"):
    strategy.step(PARAMS, batch)
  state = strategy.init(PARAMS)
  new_state, _ = strategy.step(state, batch)
  with pytest.raises(ValueError, match="already passed to a step"):  # was a segfault on JAX's CPU backend
    strategy.step(state, batch)
  strategy.step(new_state, batch)


def test_has_aux_with_a_scalar_loss_names_the_shape():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=-1), has_aux=True)
  batch = strategy.shard_batch(jax.tree.map(lambda b: b[0], _batches(1, 8)))
  with pytest.raises(TypeError, match=r"returned an array of shape \(\)"):
    strategy.step(strategy.init(PARAMS), batch)
