"""Training with every AllReduce algorithm (and compression) against psum and single-device optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jdist
from jdist import reducers
from jdist.collectives import int8_allreduce
from jdist.errors import OptionError
from jdist.models import mlp
from tests.conftest import assert_trees_all_close, single_device_reference


def _batches(steps=20, batch=32, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(batch, 6)).astype(np.float32), "y": rng.integers(0, 3, batch).astype(np.int32)}
          for _ in range(steps)]


def _train(strategy, params, batches):
  state = strategy.init(params)
  for b in batches:
    state, m = strategy.step(state, strategy.shard_batch(b))
  return state, float(m["loss"])


PARAMS = mlp.init(jax.random.key(0), [6, 16, 3])


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree"])
@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_each_algorithm_trains_like_psum_and_one_device(algorithm, backend):
  mesh = jdist.make_mesh(data=8)
  batches = _batches()
  ours, _ = _train(jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, reducer=reducers.mean(algorithm),
                                       backend=backend), PARAMS, batches)
  ref, _ = _train(jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh), PARAMS, batches)
  assert_trees_all_close(ours.params, ref.params, rtol=1e-5)
  single, _, _ = single_device_reference(mlp.loss, optax.adam(1e-2), PARAMS, batches)
  assert_trees_all_close(ours.params, single, rtol=1e-5)


def test_halving_doubling_on_six_devices_and_tiny_buckets():
  mesh = jdist.make_mesh(data=6, devices=jax.devices()[:6])
  batches = _batches(batch=36)
  ours, _ = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh,
                                       reducer=reducers.mean("halving_doubling", bucket_bytes=100)), PARAMS, batches)
  single, _, _ = single_device_reference(mlp.loss, optax.sgd(0.1), PARAMS, batches)
  assert_trees_all_close(ours.params, single, rtol=1e-5)


def test_hierarchical_on_a_2x4_mesh():
  mesh = jdist.make_mesh(node=2, device=4)
  batches = _batches()
  ours, _ = _train(jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, axis=("node", "device"),
                                       reducer=reducers.mean("hierarchical")), PARAMS, batches)
  single, _, _ = single_device_reference(mlp.loss, optax.adam(1e-2), PARAMS, batches)
  assert_trees_all_close(ours.params, single, rtol=1e-5)


def test_bad_algorithm_arguments():
  mesh = jdist.make_mesh(data=8)
  with pytest.raises(OptionError) as err:
    reducers.mean("butterfly")
  assert (err.value.name, err.value.got) == ("algorithm", "butterfly")
  with pytest.raises(OptionError) as err:  # hierarchical reduces over two mesh axes
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.mean("hierarchical"))
  assert (err.value.name, err.value.got) == ("axis", "data")


def test_compression_off_equals_no_compression_and_bf16_is_close():
  mesh = jdist.make_mesh(data=8)
  batches = _batches()
  plain, _ = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh), PARAMS, batches)
  off, _ = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.mean()), PARAMS, batches)
  assert_trees_all_close(off.params, plain.params, rtol=0, atol=0)
  bf16, _ = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.bf16(reducers.mean("ring"))),
                   PARAMS, batches)
  assert_trees_all_close(bf16.params, plain.params, rtol=2e-2, atol=2e-2)


def test_int8_error_feedback_identity_and_exact_sum():
  mesh = jdist.make_mesh(data=8)
  rng = np.random.default_rng(0)
  g = rng.normal(size=(8, 37)).astype(np.float32)
  r0 = 0.01 * rng.normal(size=(8, 37)).astype(np.float32)

  def body(g, r):
    out, res = int8_allreduce({"g": g[0]}, {"g": r[0]}, "data", op="sum")
    return out["g"][None], res["g"][None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P("data")),
                            check_vma=False))
  total, res = jax.device_get(f(g, r0))
  x = g + r0
  scale = np.abs(x).max() / 127
  q = np.clip(np.round(x / scale), -127, 127)
  sent = q * scale
  np.testing.assert_allclose(sent + res, x, rtol=0, atol=1e-6)  # sent + residual = gradient + previous residual
  for d in range(8):
    np.testing.assert_allclose(total[d], q.sum(0) * scale, rtol=1e-6, atol=1e-6)  # the quantised values, summed
  np.testing.assert_allclose(total[0], x.sum(0), atol=8 * scale)


def test_bf16_gradients_keep_a_float32_residual_and_small_coordinates_arrive():
  # a coordinate 1e-5 of the largest is below int8's step (1/127 of it): error feedback accumulates it until it
  # is sent. In a bf16 residual it stalled (1e-5 is under half a bf16 step there) and never arrived
  for compression in (reducers.int8(), reducers.powersgd()):
    strategy = jdist.data_parallel(mlp.loss, optax.adam(0.1), jdist.make_mesh(data=8), reducer=compression)
    state = strategy.init(jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.extra["reducer"].per_device)} == {jnp.dtype(jnp.float32)}
    # a step keeps every dtype of the state (else it compiles again and its checkpoints fit no fresh state)
    dtypes = jax.tree.map(lambda x: x.dtype, state)
    state, _ = strategy.step(state, strategy.shard_batch(_batches(steps=1)[0]))
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes, compression.name
  g = jnp.array([1.0, 1e-5], jnp.bfloat16)

  def body(r):  # 600 steps of the same bf16 gradient on each of 2 devices, summed
    def one(i, carry):
      sent, r = carry
      out, r = int8_allreduce({"g": g}, {"g": r}, "data", op="sum")
      return sent + out["g"].astype(jnp.float32), r["g"]
    sent, r = jax.lax.fori_loop(0, 600, one, (jnp.zeros(2), r[0]))
    return sent[None], r[None]

  mesh = jdist.make_mesh(data=2, devices=jax.devices()[:2])
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=(P("data"), P("data")), check_vma=False))
  sent, residual = jax.device_get(f(jnp.zeros((2, 2), jnp.float32)))
  assert residual.dtype == np.float32
  # what was sent plus what is still owed is what was given: 2 devices x 600 x 1e-5, to bf16's rounding of g
  np.testing.assert_allclose(sent[0, 1] + residual[:, 1].sum(), 2 * 600 * float(g[1]), rtol=1e-3)
  assert sent[0, 1] > 0.5 * 2 * 600 * float(g[1])  # most of it arrived (with a bf16 residual: none)


def test_int8_training_keeps_residual_per_device_and_converges():
  mesh = jdist.make_mesh(data=8)
  batches = _batches(steps=60)
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.int8())
  state, loss = _train(strategy, PARAMS, batches)
  res = state.extra["reducer"].per_device
  leaf = jax.tree.leaves(res)[0]
  assert leaf.shape[0] == 8 and leaf.sharding.spec == P(("data",))
  assert float(jnp.abs(leaf).max()) > 0
  plain, plain_loss = _train(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh), PARAMS, batches)
  assert abs(loss - plain_loss) < 0.05
  report = jdist.comm_report(strategy.step.lower(state, strategy.shard_batch(batches[0])))
  assert report["all-to-all"].count >= 1 and report["all-gather"].count >= 1
