"""Flax NNX models: dropout through a ``takes_key`` loss, sharding from ``nnx.with_partitioning`` annotations
(``jdist.rules_from_flax``), each equal to the single-device loop given the same keys."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jdist
from jdist.errors import RuleError
from tests.conftest import assert_trees_all_close

STEPS = 3


class MLP(nnx.Module):
  """Two annotated layers with dropout between them. The Dropout holds no rngs: the loss passes the key."""

  def __init__(self, rngs, rate=0.25):
    part = lambda init, names: nnx.with_partitioning(init, names)
    self.up = nnx.Linear(8, 32, kernel_init=part(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=part(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
    self.drop = nnx.Dropout(rate)
    self.down = nnx.Linear(32, 8, kernel_init=part(nnx.initializers.lecun_normal(), ("mlp", "embed")), rngs=rngs)

  def __call__(self, x, key=None):
    return self.down(self.drop(nnx.relu(self.up(x)), rngs=key, deterministic=key is None))


def _model():
  with nnx.use_eager_sharding(False):  # flax records the annotations; jdist places the parameters
    model = MLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jdist.takes_key
  def loss(params, batch, key):  # README's recipe
    logits = nnx.merge(graphdef, params, rest)(batch["x"], key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return model, params, loss


def _batches():
  rng = np.random.default_rng(1)
  return [{"x": rng.normal(size=(16, 8)).astype(np.float32), "y": rng.integers(0, 8, 16).astype(np.int32)}
          for _ in range(STEPS)]


def one_device(loss, optimizer, params, batches, key_data, pieces):
  """The single-device loop: piece i of step t's batch gets ``shard_key(key, t, i)``; the loss is their mean."""
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, t):
    def total(p):
      parts = jax.tree.map(lambda x: x.reshape(pieces, -1, *x.shape[1:]), batch)
      return sum(loss.fn(p, jax.tree.map(lambda x: x[i], parts), jdist.shard_key(key_data, t, i))
                 for i in range(pieces)) / pieces
    updates, opt_state = optimizer.update(jax.grad(total)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for t, batch in enumerate(batches):
    params, opt_state = step(params, opt_state, batch, t)
  return params


def _train(strategy, params, batches):
  state = strategy.init(params, key=5)
  key_data = jnp.asarray(np.asarray(state.key))
  for batch in batches:
    state, _ = strategy.step(state, strategy.shard_batch(batch))
  return state, key_data


LOGICAL = [("embed", "fsdp"), ("mlp", "model")]


def test_nnx_dropout_under_data_parallel_equals_one_device_with_the_same_keys():
  _, params, loss = _model()
  state, key_data = _train(jdist.data_parallel(loss, optax.adam(1e-2), jdist.make_mesh(data=8)), params, _batches())
  ref = one_device(loss, optax.adam(1e-2), params, _batches(), key_data, pieces=8)
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)


def test_nnx_annotations_shard_fsdp_x_tp_and_equal_one_device():
  model, params, loss = _model()
  rules = jdist.rules_from_flax(model, LOGICAL)
  assert dict(rules) == {"^up/kernel$": P("fsdp", "model"), "^up/bias$": P("model"),
                         "^down/kernel$": P("model", "fsdp")}
  mesh = jdist.make_mesh(fsdp=2, model=4)
  strategy = jdist.sharded(loss, optax.adam(1e-2), mesh, rules=rules, fsdp_axis="fsdp")
  state, key_data = _train(strategy, params, _batches())
  kernel = state.params["up"]["kernel"][...]
  assert kernel.sharding.spec == P("fsdp", "model") and kernel.sharding.shard_shape(kernel.shape) == (4, 8)
  # GSPMD runs the loss once on the global batch: one piece, as on one device
  ref = one_device(loss, optax.adam(1e-2), params, _batches(), key_data, pieces=1)
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)


def test_rules_match_nnx_paths_with_or_without_value():
  _, params, _ = _model()
  for pattern in ("up/kernel$", "up/kernel/value$"):
    specs, report = jdist.partition_specs(params, [(pattern, (None, "model"))], {"model": 4})
    assert specs["up"]["kernel"].get_value() == P(None, "model"), pattern
    assert report.matched_by["up/kernel/value"] == pattern
  with pytest.raises(RuleError) as err:  # a rule that matches nothing is an error, never silence
    jdist.partition_specs(params, [("kernal$", (None, "model"))], {"model": 4})
  assert err.value.rule == ("kernal$",) and "up/kernel/value" in str(err.value)


def test_rules_from_flax_logical_names():
  model, params, _ = _model()
  # the state from nnx.split gives the same rules as the module
  assert jdist.rules_from_flax(params, LOGICAL) == jdist.rules_from_flax(model, LOGICAL)
  # a logical name no rule maps is an error naming it and the parameter (it would stay replicated unseen)
  with pytest.raises(RuleError) as err:
    jdist.rules_from_flax(model, [("embed", "fsdp")])
  assert err.value.rule == "mlp" and err.value.param == "down/kernel"  # the first in path order
  # as flax's logical_to_mesh_axes: the first rule whose axis the parameter does not use yet; None replicates
  rules = dict(jdist.rules_from_flax(model, [("embed", "model"), ("mlp", "model"), ("mlp", "data")]))
  assert rules["^up/kernel$"] == P("model", "data") and rules["^down/kernel$"] == P("model", None)
  assert dict(jdist.rules_from_flax(model, [("embed", None), ("mlp", ("data", "model"))]))["^up/kernel$"] == P(
      None, ("data", "model"))
  # without logical rules the annotations are mesh axis names
  assert dict(jdist.rules_from_flax(model))["^up/kernel$"] == P("embed", "mlp")
  with pytest.raises(RuleError):
    jdist.rules_from_flax(model, [("embed",)])
  with pytest.raises(TypeError):
    jdist.rules_from_flax({"w": np.zeros(3)}, LOGICAL)
