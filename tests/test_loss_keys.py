"""A loss that takes a key (``jdist.takes_key``): every strategy equals one device that splits the global batch
into the same pieces and gives piece i of step t the key ``jdist.shard_key(state.key, t, i)``."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.strategies.async_sgd import split_workers
from tests.conftest import assert_trees_all_close

STEPS = 3


@jdist.takes_key
def dropout_loss(params, batch, key):
  """A one-hidden-layer classifier with dropout (rate 0.5) on the hidden layer."""
  h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
  h = jnp.where(jax.random.bernoulli(key, 0.5, h.shape), h / 0.5, 0.0)
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"], batch["y"]).mean()


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w1": jax.random.normal(k1, (6, 32)) * 0.5, "b1": jnp.zeros(32), "w2": jax.random.normal(k2, (32, 3)) * 0.5}


def _batches(n=16):
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}
          for _ in range(STEPS)]


def split_reference(loss, optimizer, params, batches, key_data, pieces):
  """One device: each step's batch cut into ``pieces`` equal pieces in batch order, piece i of step t with key
  ``shard_key(key_data, t, i)``; the loss is their mean (the mean over the global batch)."""
  opt_state = optimizer.init(params)
  key_data = jnp.asarray(key_data)

  def total(p, batch, t):
    parts = jax.tree.map(lambda x: x.reshape(pieces, -1, *x.shape[1:]), batch)
    losses = [loss.fn(p, jax.tree.map(lambda x: x[i], parts), jdist.shard_key(key_data, t, i)) for i in range(pieces)]
    return sum(losses) / pieces

  for t, batch in enumerate(batches):
    grads = jax.grad(total)(params, batch, t)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params


def _train(strategy, params, batches, key=7):
  state = strategy.init(params, key=key)
  key_data = np.asarray(state.key)  # read before the first step donates the state
  for b in batches:
    state, _ = strategy.step(state, strategy.shard_batch(b))
  return state, key_data


def _mesh(**axes):
  import math
  return jdist.make_mesh(**axes, devices=jax.devices()[:math.prod(axes.values())])


CASES = {  # name -> (strategy factory, pieces of the global batch)
    "dp4": (lambda opt: jdist.data_parallel(dropout_loss, opt, _mesh(data=4)), 4),
    "dp4_accumulate2": (lambda opt: jdist.data_parallel(dropout_loss, opt, _mesh(data=4), accumulate_steps=2), 8),
    "dp4_pmap_accumulate2": (lambda opt: jdist.data_parallel(dropout_loss, opt, _mesh(data=4), backend="pmap",
                                                             accumulate_steps=2), 8),
    "dp1_accumulate2": (lambda opt: jdist.data_parallel(dropout_loss, opt, _mesh(data=1), accumulate_steps=2), 2),
    "dp2x2": (lambda opt: jdist.data_parallel(dropout_loss, opt, _mesh(replica=2, data=2), axis=("replica", "data")),
              4),
    "local_sgd4_h1": (lambda opt: jdist.local_sgd(dropout_loss, opt, _mesh(data=4)), 4),
    "fsdp4": (lambda opt: jdist.model_parallel.fsdp(dropout_loss, opt, _mesh(fsdp=4), min_size=16), 4),
    "sharded_fsdp4": (lambda opt: jdist.sharded(dropout_loss, opt, _mesh(fsdp=4), fsdp_axis="fsdp",
                                                fsdp_min_size=16), 1),
    "sharded_data2_model2": (lambda opt: jdist.sharded(dropout_loss, opt, _mesh(data=2, model=2),
                                                       rules=[("w1", (None, "model"))]), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keyed_loss_equals_one_device_splitting_the_batch_alike(case):
  make, pieces = CASES[case]
  params, batches = _params(), _batches()
  state, key_data = _train(make(optax.sgd(0.5)), params, batches)  # local SGD equals data parallel only for SGD
  ref = split_reference(dropout_loss, optax.sgd(0.5), params, batches, key_data, pieces)
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)
  # the masks matter: the same steps with the keys of another piece layout (or seed) give other parameters
  other = split_reference(dropout_loss, optax.sgd(0.5), params, batches, key_data, 2 if pieces != 2 else 4)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(ref))) > 1e-3


def test_async_sgd_keys_are_the_ticks_key_the_workers_clock_and_index():
  """Worker w's loss gets ``shard_key(state.key, clock[w], w)``; with no pauses and apply="mean" a tick is one
  step of the mean gradient, each worker's slice with its key (the state's key is split every tick)."""
  params, batches = _params(), _batches()
  strategy = jdist.async_sgd(dropout_loss, optax.sgd(0.5), _mesh(workers=4), num_workers=4)
  state = strategy.init(params, key=3)
  ref = params
  for t, batch in enumerate(batches):
    key_data = jnp.asarray(np.asarray(state.key))
    clock = np.asarray(state.extra["clock"])
    assert (clock == t).all()
    parts = split_workers(batch, 4)

    def total(p):
      return sum(dropout_loss.fn(p, jax.tree.map(lambda x: x[w], parts), jdist.shard_key(key_data, clock[w], w))
                 for w in range(4)) / 4

    ref = jax.tree.map(lambda p, g: p - 0.5 * g, ref, jax.grad(total)(ref))
    state, _ = strategy.step(state, strategy.shard_batch(parts))
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)


def test_scan_steps_derives_the_same_keys_as_step():
  params, batches = _params(), _batches()
  strategy = jdist.data_parallel(dropout_loss, optax.adam(1e-2), _mesh(data=4))
  stepped, _ = _train(strategy, params, batches)
  scanned, _ = jdist.scan_steps(strategy, strategy.init(params, key=7), jax.tree.map(lambda *x: np.stack(x), *batches))
  assert_trees_all_close(jax.device_get(scanned.params), jax.device_get(stepped.params), rtol=1e-6)


def test_a_plain_loss_is_unchanged_and_gets_no_key():
  """No key reaches a plain loss: its compiled step is the one of before (no random bits computed)."""
  from jdist.models import mlp
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), _mesh(data=4))
  params = mlp.init(jax.random.key(0), [6, 8, 3])
  state = strategy.init(params)
  hlo = strategy.step.lower(state, strategy.shard_batch(_batches()[0])).as_text()
  assert "threefry" not in hlo.lower() and "rng" not in hlo.lower()
