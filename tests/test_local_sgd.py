"""Local SGD and DiLoCo: H=1 with plain SGD is data parallelism; outer SGD lr 1 is plain averaging."""
import jax
import numpy as np
import optax
import pytest

import jdist
from jdist.errors import OptionError, OptionTypeError
from jdist.models import mlp
from tests.conftest import assert_trees_all_close

PARAMS = mlp.init(jax.random.key(0), [6, 16, 3])


def _batches(steps=16, batch=32, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(batch, 6)).astype(np.float32), "y": rng.integers(0, 3, batch).astype(np.int32)}
          for _ in range(steps)]


def _train(strategy, batches):
  state = strategy.init(PARAMS)
  history = []
  for b in batches:
    state, m = strategy.step(state, strategy.shard_batch(b))
    history.append(jax.device_get(m))
  return state, history


@pytest.mark.parametrize("algorithm", ["psum", "ring"])
def test_sync_every_1_with_sgd_equals_data_parallel(algorithm):
  mesh = jdist.make_mesh(data=8)
  batches = _batches()
  local, hist = _train(jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, sync_every=1,
                                       reducer=jdist.reducers.mean(algorithm)), batches)
  dp, dp_hist = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh), batches)
  assert_trees_all_close(local.params, dp.params, rtol=1e-5)
  np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in dp_hist], rtol=1e-5)
  for r in range(8):  # every replica was reset to the average
    assert_trees_all_close(jax.tree.map(lambda x: x[r], local.extra["replicas"]), dp.params, rtol=1e-5)


def test_outer_sgd_lr1_equals_plain_averaging_and_replicas_diverge_between_syncs():
  mesh = jdist.make_mesh(data=8)
  batches = _batches()
  plain, hist = _train(jdist.local_sgd(mlp.loss, optax.adam(1e-2), mesh, sync_every=4), batches)
  outer, _ = _train(jdist.local_sgd(mlp.loss, optax.adam(1e-2), mesh, sync_every=4, outer_optimizer=optax.sgd(1.0)),
                    batches)
  assert_trees_all_close(outer.params, plain.params, rtol=1e-5, atol=1e-6)
  assert [h["synced"] for h in hist] == [0, 0, 0, 1] * 4
  assert all(h["replica_spread"] > 0 for h in hist[3:])
  assert hist[0]["replica_spread"] == 0


def test_local_sgd_equals_numpy_model_averaging():
  """Independent check: N separate optax runs on their shards, averaged every H steps."""
  mesh = jdist.make_mesh(data=4, devices=jax.devices()[:4])
  batches = _batches(steps=6, batch=16)
  ours, _ = _train(jdist.local_sgd(mlp.loss, optax.sgd(0.1, momentum=0.9), mesh, sync_every=3), batches)
  opt = optax.sgd(0.1, momentum=0.9)
  replicas = [PARAMS] * 4
  states = [opt.init(PARAMS) for _ in range(4)]
  grad = jax.jit(jax.grad(mlp.loss))
  for t, b in enumerate(batches):
    for d in range(4):
      shard = jax.tree.map(lambda x: x[d * 4:(d + 1) * 4], b)
      updates, states[d] = opt.update(grad(replicas[d], shard), states[d], replicas[d])
      replicas[d] = optax.apply_updates(replicas[d], updates)
    if (t + 1) % 3 == 0:
      mean = jax.tree.map(lambda *xs: sum(xs) / 4, *replicas)
      replicas = [mean] * 4
  assert_trees_all_close(ours.params, replicas[0], rtol=1e-5, atol=1e-6)


def test_diloco_runs_and_reduces_loss():
  mesh = jdist.make_mesh(data=8)
  batches = _batches(steps=40)
  state, hist = _train(jdist.local_sgd(mlp.loss, optax.adam(1e-2), mesh, sync_every=4,
                                       outer_optimizer=optax.sgd(0.7, momentum=0.9, nesterov=True)), batches)
  assert hist[-1]["loss"] < hist[0]["loss"]
  assert jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, sync_every=4,
                         outer_optimizer=optax.sgd(0.7)).name == "diloco[H=4]"


def test_bad_arguments():
  mesh = jdist.make_mesh(data=8)
  with pytest.raises(ValueError, match="sync_every must be a positive int, got 0"):
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, sync_every=0)
  with pytest.raises(OptionError) as err:
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, reducer=jdist.reducers.mean("rnig"))
  assert (err.value.name, err.value.got) == ("algorithm", "rnig") and "Did you mean 'ring'?" in str(err.value)
  with pytest.raises(OptionTypeError) as err:
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, reducer="ring")
  assert err.value.name == "reducer"
  with pytest.raises(TypeError, match="optax.GradientTransformation"):
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, outer_optimizer="sgd")
  with pytest.raises(OptionError) as err:  # hierarchical reduces over two axes; local SGD's replicas lie on one
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, reducer=jdist.reducers.mean("hierarchical"))
  assert (err.value.name, err.value.got) == ("axis", "data")
  mesh2 = jdist.make_mesh(node=2, device=4)
  with pytest.raises(ValueError, match=r"local_sgd runs over one mesh axis, got axis=\('node', 'device'\) \(2 names\)"
                                       r"\. Pass one name, e.g. axis='node'.*jdist.make_mesh\(data=-1"):
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh2, axis=("node", "device"))  # was "too many values to unpack"
  with pytest.raises(TypeError, match="axis must be a mesh axis name"):
    jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, axis=0)
  one = jdist.make_mesh(node=1, device=4, devices=jax.devices()[:4])
  info = jdist.local_sgd(mlp.loss, optax.sgd(0.1), one, axis=["device"]).info  # one name
  assert dict(info) == {"sync_every": 1, "axis": "device", "devices": 4, "reducer": "psum"}


def test_bf16_parameters_train():
  # the replica spread is summed in float32 whatever the parameter dtype (bf16 params used to fail to trace)
  params = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), mlp.init(jax.random.key(0), [6, 16, 3]))
  strategy = jdist.local_sgd(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), sync_every=2)
  state = strategy.init(params)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(4):
    batch = {"x": rng.normal(size=(32, 6)).astype(np.float32), "y": rng.integers(0, 3, 32).astype(np.int32)}
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(state.params))
  assert np.isfinite(losses).all() and np.isfinite(float(metrics["replica_spread"]))


def test_averaging_through_a_compressing_reducer():
  # the reducer carries the averaging: int8 sends the replicas (DiLoCo: their outer gradients) as int8 with error
  # feedback, its residual kept per device; plain averaging with H=1 stays close to the exact average
  mesh = jdist.make_mesh(data=8)
  batches = _batches(steps=8)
  exact, _ = _train(jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, sync_every=2), batches)
  for outer in (None, optax.sgd(1.0)):
    strategy = jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh, sync_every=2, outer_optimizer=outer,
                               reducer=jdist.reducers.int8())
    state, hist = _train(strategy, batches)
    assert strategy.name.endswith("[H=2,int8]")
    residual = jax.tree.leaves(state.extra["reducer"].per_device)[0]
    assert residual.shape[0] == 8 and float(abs(residual).max()) > 0
    assert_trees_all_close(state.params, exact.params, rtol=0.05, atol=0.02)
    assert [h["synced"] for h in hist] == [0, 1] * 4
  report = jdist.comm_report(strategy.step.lower(state, strategy.shard_batch(batches[0])))
  assert report["all-to-all"].count >= 1  # int8's own sum
