"""Synchronous data parallelism equals single-device optax on the global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jdist
from jdist import reducers
from jdist.errors import OptionError, OptionTypeError
from jdist.models import linear, mlp
from tests.conftest import assert_trees_all_close, single_device_reference


def _mlp_data(seed, steps, batch, d_in=6, classes=3):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(steps, batch, d_in)).astype(np.float32)
  ys = rng.integers(0, classes, size=(steps, batch)).astype(np.int32)
  return [{"x": x, "y": y} for x, y in zip(xs, ys)]


def _run(strategy, params, batches):
  state = strategy.init(params)
  losses = []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  return state, losses


OPTIMIZERS = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2)}


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_equals_single_device(n, opt, backend):
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  batches = _mlp_data(n, steps=50, batch=16)
  mesh = jdist.make_mesh(data=n, devices=jax.devices()[:n])
  strategy = jdist.data_parallel(mlp.loss, OPTIMIZERS[opt](), mesh, backend=backend)
  state, losses = _run(strategy, params, batches)
  ref_params, ref_opt, ref_losses = single_device_reference(mlp.loss, OPTIMIZERS[opt](), params, batches)
  assert_trees_all_close(state.params, ref_params, rtol=1e-5)
  assert_trees_all_close(state.opt_state, ref_opt, rtol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert int(state.step) == 50


def test_gradient_is_not_n_times_too_large():
  """Regression for docs/pitfalls.md pitfall 1: grads of replicated params come back psum'ed."""
  params = linear.init(in_features=3)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(16, 3)).astype(np.float32), "y": rng.normal(size=(16, 1)).astype(np.float32)}
  mesh = jdist.make_mesh(data=8)
  strategy = jdist.data_parallel(linear.loss, optax.sgd(1.0), mesh)
  state, metrics = strategy.step(strategy.init(params), strategy.shard_batch(batch))
  grads = jax.grad(linear.loss)(params, batch)
  # With lr 1 and SGD, params move by exactly -grad; an 8x gradient would move 8x as far.
  assert_trees_all_close(state.params, jax.tree.map(lambda p, g: p - g, params, grads), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-6)


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_accumulation_equals_full_batch(backend):
  params = mlp.init(jax.random.key(1), [6, 16, 3])
  batches = _mlp_data(7, steps=10, batch=64)
  mesh = jdist.make_mesh(data=4, devices=jax.devices()[:4])
  full = jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, backend=backend)
  micro = jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, backend=backend, accumulate_steps=4)
  s_full, l_full = _run(full, params, batches)
  s_micro, l_micro = _run(micro, params, batches)
  assert_trees_all_close(s_micro.params, s_full.params, rtol=1e-5)
  np.testing.assert_allclose(l_micro, l_full, rtol=1e-5)
  ref, _, _ = single_device_reference(mlp.loss, optax.adam(1e-2), params, batches)
  assert_trees_all_close(s_micro.params, ref, rtol=1e-5)


def test_placement_is_kept_by_a_step():
  mesh = jdist.make_mesh(data=8)
  strategy = jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh)
  state = strategy.init(mlp.init(jax.random.key(0), [6, 16, 3]))
  batch = strategy.shard_batch(_mlp_data(0, 1, 32)[0])
  assert batch["x"].sharding.shard_shape(batch["x"].shape) == (4, 6)
  assert batch["x"].sharding.spec == P(("data",))
  before = jax.tree.map(lambda x: x.sharding, state)
  state, _ = strategy.step(state, batch)
  for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
    assert leaf.sharding.is_fully_replicated
    assert leaf.sharding.shard_shape(leaf.shape) == leaf.shape
    assert len(leaf.sharding.device_set) == 8
  after = jax.tree.map(lambda x: x.sharding, state)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.is_equivalent_to(b, 0) or a == b, before, after))


def test_has_aux_metrics_and_flax_nnx_params():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)))

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

  batches = _mlp_data(3, steps=20, batch=16)
  mesh = jdist.make_mesh(data=8)
  strategy = jdist.data_parallel(loss_fn, optax.adam(1e-2), mesh, has_aux=True)
  state, _ = _run(strategy, params, batches)
  ref, _, _ = single_device_reference(lambda p, b: loss_fn(p, b)[0], optax.adam(1e-2), params, batches)
  assert_trees_all_close(state.params, ref, rtol=1e-5)
  logits = nnx.merge(graphdef, jax.device_get(state.params))(batches[0]["x"])
  _, metrics = strategy.step(state, strategy.shard_batch(batches[0]))  # state is donated here
  expected_acc = float(jnp.mean(jnp.argmax(logits, -1) == batches[0]["y"]))
  np.testing.assert_allclose(float(metrics["accuracy"]), expected_acc, rtol=1e-6)
  # a model with dropout: its state holds an RNG counter and key, which cannot be differentiated. The whole
  # state is refused at init, naming the leaf; its parameters alone train
  class Dropped(Net):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  graphdef, state_all = nnx.split(Dropped(nnx.Rngs(0)))
  with pytest.raises(TypeError, match=r"params leaf .*drop.* has dtype (uint32|key<fry>); every parameter is "
                                      r"differentiated.*nnx.split\(model, nnx.Param, ...\)"):
    strategy.init(state_all)
  _, params, _ = nnx.split(Dropped(nnx.Rngs(0)), nnx.Param, ...)
  assert jax.tree.map(jnp.shape, strategy.init(params).params) == jax.tree.map(jnp.shape, params)


def _loss_with_count(params, batch):
  return mlp.loss(params, batch), {"positives": jnp.sum(batch["y"] > 0), "any": jnp.any(batch["y"] > 1)}


@pytest.mark.parametrize("kwargs", [{}, {"backend": "pmap"}, {"reducer": reducers.mean("ring")},
                                    {"reducer": reducers.bf16()}, {"reducer": reducers.int8()},
                                    {"accumulate_steps": 2}],
                         ids=lambda kw: "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in kw.items()) or "psum")
def test_integer_aux_is_averaged_like_any_metric_and_the_loss_stays_exact(kwargs):
  # integer and bool aux become float32 means over devices (and micro-batches); compressing the
  # gradients does not round the reported loss or aux
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  batch = _mlp_data(4, steps=1, batch=32)[0]
  strategy = jdist.data_parallel(_loss_with_count, optax.sgd(0.1), jdist.make_mesh(data=8), has_aux=True, **kwargs)
  _, metrics = strategy.step(strategy.init(params), strategy.shard_batch(batch))
  parts = 8 * kwargs.get("accumulate_steps", 1)
  shards = [jax.tree.map(lambda x: x.reshape(parts, -1, *x.shape[1:])[i], batch) for i in range(parts)]
  np.testing.assert_allclose(float(metrics["positives"]), np.mean([np.sum(s["y"] > 0) for s in shards]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["any"]), np.mean([np.any(s["y"] > 1) for s in shards]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), float(mlp.loss(params, batch)), rtol=1e-6)


def test_init_does_not_consume_user_params():
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8))
  state = strategy.init(params)
  strategy.step(state, strategy.shard_batch(_mlp_data(0, 1, 8)[0]))
  assert np.isfinite(np.asarray(params["layers"][0]["w"])).all()  # still readable: not donated


# ---- bad input ------------------------------------------------------------------------------------


def test_batch_not_divisible():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8))
  state = strategy.init(mlp.init(jax.random.key(0), [6, 16, 3]))
  batch = _mlp_data(0, 1, 12)[0]
  with pytest.raises(ValueError, match=r"batch size 12 is not divisible by 8"):
    strategy.shard_batch(batch)
  with pytest.raises(ValueError, match=r"batch size 12 is not divisible by 8"):
    strategy.step(state, batch)
  micro = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), accumulate_steps=4)
  with pytest.raises(ValueError, match=r"batch size 16 is not divisible by 32 .*multiple of 32"):
    micro.shard_batch(_mlp_data(0, 1, 16)[0])


def test_an_optimizer_that_needs_the_loss_gets_the_global_mean_loss():
  # reduce_on_plateau reads update(..., value=loss): every synchronous strategy passes the global batch's
  # mean loss, as a single-device loop does, so the plateau is met at the same steps
  from jdist.strategies.model_parallel import fsdp, sharded
  opt = optax.chain(optax.sgd(0.5), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=0.2))
  params, batches = mlp.init(jax.random.key(0), [6, 16, 3]), _mlp_data(0, 6, 16)
  ref, ref_opt, _ = single_device_reference(mlp.loss, opt, params, batches)
  assert float(ref_opt[1].scale) < 1  # the plateau was met
  for strategy in (jdist.data_parallel(mlp.loss, opt, jdist.make_mesh(data=8)),
                   fsdp(mlp.loss, opt, jdist.make_mesh(fsdp=8), min_size=1),
                   sharded(mlp.loss, opt, jdist.make_mesh(fsdp=8), fsdp_axis="fsdp")):
    state = strategy.init(params)
    for b in batches:
      state, _ = strategy.step(state, strategy.shard_batch(b))
    assert_trees_all_close(jax.device_get(state.opt_state[1]), ref_opt[1], rtol=1e-5, atol=1e-6)
    assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)
  # one that takes extra arguments but refuses value= (sharpness-aware minimisation) runs as on one device
  sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2)
  ref, _, _ = single_device_reference(mlp.loss, sam, params, batches)
  strategy = jdist.data_parallel(mlp.loss, sam, jdist.make_mesh(data=8))
  state = strategy.init(params)
  for b in batches:
    state, _ = strategy.step(state, strategy.shard_batch(b))
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match=r"value_fn.*optimizer.update\(grads, state, params, value=loss\).*cannot run"):
    strategy = jdist.data_parallel(mlp.loss, optax.lbfgs(), jdist.make_mesh(data=8))
    state = strategy.init(params)
    strategy.step(state, strategy.shard_batch(batches[0]))


def test_a_batch_of_no_examples_is_an_error_in_every_strategy():
  # its mean loss is nan and the optimizer would still step (Adam's count, a schedule)
  from jdist.strategies.model_parallel import fsdp, sharded
  mesh = jdist.make_mesh(data=8)
  empty = {"x": np.zeros((0, 6), np.float32), "y": np.zeros((0,), np.int32)}
  for strategy in (jdist.data_parallel(mlp.loss, optax.adam(0.1), mesh),
                   jdist.data_parallel(mlp.loss, optax.adam(0.1), jdist.make_mesh(data=1, devices=jax.devices()[:1])),
                   jdist.local_sgd(mlp.loss, optax.adam(0.1), mesh, sync_every=2),
                   fsdp(mlp.loss, optax.adam(0.1), jdist.make_mesh(fsdp=8)),
                   sharded(mlp.loss, optax.adam(0.1), jdist.make_mesh(fsdp=8), fsdp_axis="fsdp")):
    state = strategy.init(mlp.init(jax.random.key(0), [6, 16, 3]))
    for call in (lambda: strategy.shard_batch(empty), lambda: strategy.step(state, empty)):
      with pytest.raises(ValueError, match=r"The batch has no examples \(leading size 0\); pass at least"):
        call()


def test_a_mesh_axis_the_strategy_does_not_use_is_an_error():
  # its devices would each compute the same step: 4x the work for the speed of 2 devices
  from jdist.strategies.model_parallel import fsdp, sharded
  mesh = jdist.make_mesh(data=2, model=4)
  idle = (r"uses mesh axes \('data',\), but the mesh also has 'model' of size 4: the devices along it would each "
          r"compute ")
  hint = r"or build the mesh without it, e.g. jdist.make_mesh\(data=2, devices=jax.devices\(\)\[:2\]\)"
  for make, fix in ((lambda: jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh), "name it in axis"),
                    (lambda: jdist.local_sgd(mlp.loss, optax.sgd(0.1), mesh), "put all of them on it"),
                    (lambda: sharded(mlp.loss, optax.sgd(0.1), mesh), "with data_axis, or the parameters with rules")):
    with pytest.raises(ValueError, match=idle + r"the same thing\. .*" + fix + r".*" + hint):
      make()
  with pytest.raises(ValueError, match=r"fsdp uses mesh axes \('model',\), but the mesh also has 'data' of size 2"):
    fsdp(mlp.loss, optax.sgd(0.1), mesh, axis="model")
  with pytest.raises(ValueError,
                     match=r"async_sgd uses mesh axes \('model',\), but the mesh also has 'data' of size 2"):
    jdist.async_sgd(mlp.loss, optax.sgd(0.1), mesh, num_workers=4, axis="model")
  with pytest.raises(ValueError, match=r"pipeline uses mesh axes \('model',\), .*name it in data_axis"):
    jdist.pipeline(lambda layer, x: x, lambda p, y, b: 0.0, optax.sgd(0.1), mesh, axis="model", microbatches=2)
  with pytest.raises(ValueError, match=r"sharded uses mesh axes \(\), .*jdist.make_mesh\(data=1, devices=jax.devices"):
    sharded(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), data_axis=None)  # no axis used at all
  # every axis used: data x model under tensor-parallel rules, the batch over both axes
  sharded(mlp.loss, optax.sgd(0.1), mesh, rules=mlp.tp_rules(2))
  jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, axis=("data", "model"))


def test_axis_not_in_mesh():
  with pytest.raises(ValueError, match=r"'batch' is not an axis of the mesh; the mesh has axes \('data',\)"):
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8), axis="batch")


def test_non_scalar_loss():
  strategy = jdist.data_parallel(lambda p, b: (b["x"] @ p["w"]) ** 2, optax.sgd(0.1), jdist.make_mesh(data=8))
  state = strategy.init({"w": jnp.ones((6,))})
  with pytest.raises(ValueError, match=r"must return a scalar .* returned shape \(2,\)"):
    strategy.step(state, strategy.shard_batch({"x": np.ones((16, 6), np.float32)}))


def test_leaves_with_different_leading_sizes():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8))
  bad = {"x": np.ones((16, 6), np.float32), "y": np.zeros((8,), np.int32)}
  with pytest.raises(ValueError, match=r"different leading sizes \(\['x'\]: 16, \['y'\]: 8\)"):
    strategy.shard_batch(bad)


def test_bad_arguments():
  mesh = jdist.make_mesh(data=8)
  for kwargs, error, name, got in (({"backend": "mpi"}, OptionError, "backend", "mpi"),
                                   ({"accumulate_steps": 0}, OptionError, "accumulate_steps", 0),
                                   ({"reducer": "int8"}, OptionTypeError, "reducer", "int8")):
    with pytest.raises(error) as err:
      jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, **kwargs)
    assert (err.value.name, err.value.got) == (name, got)
  with pytest.raises(OptionTypeError) as err:
    jdist.data_parallel(mlp.loss, 0.1, mesh)
  assert err.value.name == "optimizer"
  with pytest.raises(OptionError) as err:  # pmap maps one axis holding every device
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=2, model=4), backend="pmap")
  assert (err.value.name, err.value.got) == ("axis", "data")
  with pytest.raises(TypeError, match="has_aux=True"):
    s = jdist.data_parallel(lambda p, b: (mlp.loss(p, b), 1.0), optax.sgd(0.1), mesh)
    s.step(s.init(mlp.init(jax.random.key(0), [6, 3])), s.shard_batch(_mlp_data(0, 1, 8)[0]))
  with pytest.raises(TypeError, match=r"key must be a JAX PRNG key \(jax.random.key\(0\)\), raw uint32 key data"):
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh).init(mlp.init(jax.random.key(0), [6, 3]), key="a")
  # an aux key named like a metric would silently replace the real loss in the logs
  s = jdist.data_parallel(lambda p, b: (mlp.loss(p, b), {"loss": 0.0}), optax.sgd(0.1), mesh, has_aux=True)
  with pytest.raises(ValueError, match=r"aux has key\(s\) \['loss'\], which would overwrite"):
    s.step(s.init(mlp.init(jax.random.key(0), [6, 3])), s.shard_batch(_mlp_data(0, 1, 8)[0]))


def test_invalid_reducer_combinations_cannot_be_written():
  # what were pairwise checks between options: int8 sums through its own all-to-all (no algorithm, no buckets), a
  # PowerSGD rank belongs to powersgd; what remains is checked where it is written
  with pytest.raises(TypeError):
    reducers.int8(algorithm="ring")
  for make, name, got in ((lambda: reducers.mean("psum", bucket_bytes=64), "bucket_bytes", 64),
                          (lambda: reducers.mean("ring", bucket_bytes=0), "bucket_bytes", 0),
                          (lambda: reducers.mean("butterfly"), "algorithm", "butterfly"),
                          (lambda: reducers.powersgd(0), "rank", 0),
                          (lambda: reducers.powersgd(2, inner=reducers.int8()), "inner", "int8")):
    with pytest.raises(OptionError) as err:
      make()
    assert (err.value.name, err.value.got) == (name, got)
  mesh = jdist.make_mesh(data=8)
  with pytest.raises(OptionError) as err:  # hierarchical needs (outer, inner): checked when the strategy is built
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.bf16(reducers.mean("hierarchical")))
  assert (err.value.name, err.value.got) == ("axis", "data")
  assert jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, reducer=reducers.int8()).name == "data_parallel[int8]"


def test_info_is_filled_at_construction_and_read_only():
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(node=2, device=4), axis=("node", "device"),
                                 accumulate_steps=2, reducer=reducers.mean("hierarchical"))
  assert dict(strategy.info) == {"axis": ("node", "device"), "devices": 8, "backend": "shard_map",
                                 "reducer": "hierarchical", "accumulate_steps": 2}
  with pytest.raises(TypeError):
    strategy.info["devices"] = 4


def test_int8_a_nan_gradient_on_one_device_reaches_grad_norm():
  # what NanGuard watches: int8's shared-scale max must not drop the NaN of one device's gradient
  params = mlp.init(jax.random.key(0), [6, 3])
  batch = _mlp_data(0, steps=1, batch=8)[0]
  batch["x"][5, 2] = np.nan  # device 2 of 4
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=4, devices=jax.devices()[:4]),
                                 reducer=reducers.int8())
  state, metrics = strategy.step(strategy.init(params), strategy.shard_batch(batch))
  assert np.isnan(float(metrics["grad_norm"]))
  assert all(np.isnan(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_two_axis_data_parallel_equals_single_device():
  """The batch may be split over several mesh axes at once."""
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  batches = _mlp_data(5, steps=10, batch=16)
  mesh = jdist.make_mesh(replica=2, data=4)
  strategy = jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh, axis=("replica", "data"))
  state, _ = _run(strategy, params, batches)
  ref, _, _ = single_device_reference(mlp.loss, optax.adam(1e-2), params, batches)
  assert_trees_all_close(state.params, ref, rtol=1e-5)


@pytest.mark.parametrize("allreduce", ["ring", "halving_doubling", "tree"])
def test_tuple_axis_in_another_order_than_the_mesh_equals_single_device(allreduce):
  # ("device", "node") on a (node, device) mesh: the ppermute algorithms must still sum each gradient once
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  batches = _mlp_data(3, steps=3, batch=12)
  mesh = jdist.make_mesh(node=2, device=3, devices=jax.devices()[:6])
  axis = ("device", "node")
  state, losses = _run(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, axis=axis,
                                           reducer=reducers.mean(allreduce)), params, batches)
  ref, _ = _run(jdist.data_parallel(mlp.loss, optax.sgd(0.1), mesh, axis=axis), params, batches)
  assert_trees_all_close(state.params, ref.params, rtol=1e-5)
  single, _, single_losses = single_device_reference(mlp.loss, optax.sgd(0.1), params, batches)
  assert_trees_all_close(state.params, single, rtol=1e-5)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)


@pytest.mark.parametrize("case", ["accumulate", "has_aux", "ring", "data1_x_model1"])
def test_one_device_data_axis_equals_single_device(case):
  # a data axis of one device skips shard_map altogether: the same numbers in every configuration
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  batches = _mlp_data(7, steps=10, batch=16)
  loss_fn, kwargs = mlp.loss, {}
  mesh = jdist.make_mesh(data=1, devices=jax.devices()[:1])
  if case == "accumulate":
    kwargs = {"accumulate_steps": 4}
  elif case == "has_aux":
    loss_fn, kwargs = (lambda p, b: (mlp.loss(p, b), {"acc": mlp.accuracy(p, b)})), {"has_aux": True}
  elif case == "ring":
    kwargs = {"reducer": reducers.mean("ring")}
  else:  # a mesh of more axes, all of one device
    mesh = jdist.make_mesh(data=1, model=1, devices=jax.devices()[:1])
  strategy = jdist.data_parallel(loss_fn, optax.adam(1e-2), mesh, **kwargs)
  state, losses = _run(strategy, params, batches)
  ref_params, ref_opt, ref_losses = single_device_reference(mlp.loss, optax.adam(1e-2), params, batches)
  assert_trees_all_close(state.params, ref_params, rtol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh.size


# ---- issue 18, defect 1: jax.pmap read a flat in_axes tuple per leaf when the leaves happened to number the args ----


def _train_pmap_and_reference(loss_fn, params, batches, n, lr):
  mesh = jdist.make_mesh(data=n, devices=jax.devices()[:n])
  results = {}
  for backend in ("pmap", "shard_map"):
    state, losses = _run(jdist.data_parallel(loss_fn, optax.sgd(lr), mesh, backend=backend), params, batches)
    results[backend] = (jax.device_get(state.params), losses)
  ref, _, ref_losses = single_device_reference(loss_fn, optax.sgd(lr), params, batches)
  return results, ref, ref_losses


def test_pmap_trains_the_articles_problem_with_a_tuple_batch():
  # params {"w", "b"} and batch (x, y): 4 leaves for (params, batch) and, before, 4 arguments with two empty ones,
  # so pmap mapped the leaves by position ("cannot select an axis to squeeze out")
  x = np.arange(1, 9, dtype=np.float32).reshape(8, 1)
  batch = (x, 2 * x + 1)
  loss = lambda p, b: jnp.mean((b[0] @ p["w"] + p["b"] - b[1]) ** 2)
  results, ref, ref_losses = _train_pmap_and_reference(loss, {"w": jnp.zeros((1, 1)), "b": jnp.zeros((1,))},
                                                       [batch] * 5, n=4, lr=0.01)
  for params, losses in results.values():
    assert_trees_all_close(params, ref, rtol=1e-5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_pmap_maps_the_right_leaves_for_three_params_and_an_array_batch():
  # 3 parameter leaves + 1 batch leaf: before, no error and parameters 7e-2 away from one device after one step
  params = {"a": jnp.full((4, 4), 0.1), "b": jnp.full((4,), 0.2), "c": jnp.full((4, 4), 0.3)}
  X = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  loss = lambda p, x: jnp.mean(jnp.sum((jnp.tanh(x @ p["a"] + p["b"]) @ p["c"] - x) ** 2, axis=-1))
  results, ref, _ = _train_pmap_and_reference(loss, params, [X] * 3, n=4, lr=0.1)
  for params_after, _ in results.values():
    assert_trees_all_close(params_after, ref, rtol=1e-5)
