"""Reducers as values: the seam a user-written reducer plugs into (examples/topk_reducer.py), and the contract."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist import reducers
from jdist.errors import OptionTypeError
from jdist.models import mlp
from tests.conftest import assert_trees_all_close, single_device_reference
from tests.test_allreduce_training import PARAMS, _batches, _train


def _topk_example():
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "topk_reducer.py"
  spec = importlib.util.spec_from_file_location("example_topk_reducer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_user_written_topk_sending_every_entry_equals_the_mean_reducer():
  topk = _topk_example().topk
  mesh, batches = jdist.make_mesh(data=8), _batches(steps=5)
  ours, loss = _train(jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, reducer=topk(10**6)), PARAMS, batches)
  exact, exact_loss = _train(jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh), PARAMS, batches)
  assert_trees_all_close(ours.params, exact.params, rtol=1e-5, atol=1e-7)
  single, _, _ = single_device_reference(mlp.loss, optax.adam(1e-2), PARAMS, batches)
  assert_trees_all_close(ours.params, single, rtol=1e-5, atol=1e-7)
  assert loss == pytest.approx(exact_loss, rel=1e-6)
  assert max(float(jnp.abs(r).max()) for r in jax.tree.leaves(ours.extra["reducer"].per_device)) == 0  # all sent


def test_user_written_topk_trains_and_keeps_what_it_did_not_send():
  topk = _topk_example().topk
  mesh, batches = jdist.make_mesh(data=8), _batches(steps=40, seed=1)
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.3), mesh, reducer=topk(4))
  assert strategy.name == "data_parallel[top4]" and strategy.info["reducer"] == "top4"
  state = strategy.init(PARAMS)
  losses = []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  residual = jax.tree.leaves(state.extra["reducer"].per_device)[0]
  assert residual.shape[0] == 8 and float(jnp.abs(residual).max()) > 0  # one row per device, still owed
  batch = strategy.shard_batch(batches[0])
  sparse = jdist.comm_report(strategy.step.lower(state, batch))
  dense_strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.3), mesh)
  dense = jdist.comm_report(dense_strategy.step.lower(dense_strategy.init(PARAMS), batch))
  assert sparse["all-gather"].count >= 1 and sparse.total_sent_bytes < dense.total_sent_bytes


def test_a_compressing_reducer_runs_on_a_one_device_axis_and_an_exact_one_is_skipped():
  # int8 rounds even alone (its residual fills); the exact mean is the identity there, so no shard_map is built
  mesh = jdist.make_mesh(data=1, devices=jax.devices()[:1])
  batch = _batches(steps=1)[0]
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.int8())
  state, _ = strategy.step(strategy.init(PARAMS), strategy.shard_batch(batch))
  assert float(jnp.abs(jax.tree.leaves(state.extra["reducer"].per_device)[0]).max()) > 0
  exact = jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh)
  assert "shard_map" not in str(jax.make_jaxpr(exact.step.jitted)(exact.init(PARAMS), batch))


def test_init_must_return_a_reducer_state():
  bad = reducers.Reducer(init=lambda params, key: {"residual": params}, reduce=lambda g, s, axis: (g, s))
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), reducer=bad)
  with pytest.raises(OptionTypeError) as err:
    strategy.init(PARAMS)
  assert err.value.name == "reducer.init(params, key)"


def test_the_reducer_key_is_split_off_the_strategy_key():
  # the same seed gives the same PowerSGD Q; another seed another one
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), reducer=reducers.powersgd(2))
  q = lambda key: np.asarray(strategy.init(PARAMS, key=key).extra["reducer"].shared["q"]["layers"][0]["w"])
  np.testing.assert_array_equal(q(3), q(3))
  assert not np.allclose(q(3), q(4))
