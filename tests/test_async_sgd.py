"""Emulated asynchronous SGD: with no pauses and apply="mean" a tick is a data_parallel step, runs repeat by the
init key, dead workers are discarded, every layout gives one device's numbers, and bad input is a typed error.
(SSP's guarantees and the numpy parameter server: tests/test_async_ssp.py; the pieces alone:
tests/test_async_pieces.py.)"""
import pathlib

import jax
import numpy as np
import optax
import pytest

import jdist
from jdist.datasets import linear_regression
from jdist.models import linear, mlp
from jdist.errors import BatchError, OptionError, OptionTypeError
from jdist.strategies.async_sgd import (
  DelayModel,
  async_sgd,
  fixed_speeds,
  geometric,
  split_workers,
  uniform,
)
from tests._async_reference import numpy_server
from tests.conftest import assert_trees_all_close

MLP = mlp.init(jax.random.key(0), [6, 256, 3])  # the first layer big enough for the server to split it


def _mlp_batches(ticks, workers, b, seed=0):
  """Batches with leaves [ticks, workers, b, ...]."""
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(ticks, workers, b, 6)).astype(np.float32),
          "y": rng.integers(0, 3, size=(ticks, workers, b)).astype(np.int32)}


def _at(batches, t):
  return jax.tree.map(lambda x: x[t], batches)


def _lin_batches(ticks, workers, b, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(ticks, workers, b, 1)).astype(np.float32)
  return {"x": x, "y": (2 * x + 1 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)}


def _article_batches(workers, ticks):
  """The article's 8 points split over the workers, the same batch every tick: leaves [ticks, workers, b, 1]."""
  return jax.tree.map(lambda x: np.broadcast_to(x, (ticks, *x.shape)), split_workers(linear_regression(), workers))


# (1) no pauses and apply="mean": a tick is a synchronous data_parallel step


@pytest.mark.parametrize("opt,on_mesh", [("sgd", False), ("adam", False), ("adam", True), ("plateau", True)])
def test_no_pauses_every_tick_equals_data_parallel_on_the_union(opt, on_mesh):
  make = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2),  # plateau: update(..., value=loss)
          "plateau": lambda: optax.chain(optax.sgd(0.5), optax.contrib.reduce_on_plateau(patience=1, rtol=0.2))}[opt]
  n, ticks = 4, 20
  devices = jax.devices()[:n]
  mesh = jdist.make_mesh(workers=n, devices=devices) if on_mesh else None
  ours = async_sgd(mlp.loss, make(), mesh, num_workers=n, max_staleness=0 if opt == "sgd" else None)
  dp = jdist.data_parallel(mlp.loss, make(), jdist.make_mesh(data=n, devices=devices))
  batches = _mlp_batches(ticks, n, 8)
  a, d = ours.init(MLP), dp.init(MLP)
  for t in range(ticks):
    batch = _at(batches, t)
    a, m = ours.step(a, ours.shard_batch(batch))
    d, dm = dp.step(d, dp.shard_batch(jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)))
    assert_trees_all_close(a.params, d.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["loss"], dm["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], dm["grad_norm"], rtol=1e-5)
    assert int(m["sync_round"]) == 1 and int(m["num_delivered"]) == n and int(m["max_staleness"]) == 0
    assert int(m["updates"]) == 1 and int(m["num_waiting"]) == 0
  assert int(a.extra["version"]) == ticks and list(np.asarray(a.extra["clock"])) == [ticks] * n
  if opt == "plateau":  # the plateau was met, and the server saw the same losses as data_parallel
    assert float(d.opt_state[1].scale) < 1
    assert_trees_all_close(a.opt_state[1], d.opt_state[1], rtol=1e-5, atol=1e-6)
  for w in range(n):  # every worker pulled the last server parameters
    assert_trees_all_close(jax.tree.map(lambda x: x[w], a.extra["worker_params"]), a.params, rtol=0, atol=0)
  if on_mesh:  # worker copies split over the workers axis, one per device, and stay there
    leaf = a.extra["worker_params"]["layers"][0]["w"]
    assert leaf.sharding.shard_shape(leaf.shape) == (1, 6, 256)
    # the server is split over the devices too: the 6 x 256 weights and Adam's moments by columns, the
    # small leaves (under 1024 elements) whole on every device
    server = a.params["layers"][0]["w"]
    assert server.sharding.shard_shape(server.shape) == (6, 256 // n)
    if opt == "adam":
      mu = a.opt_state[0].mu["layers"][0]["w"]
      assert mu.sharding.shard_shape(mu.shape) == (6, 256 // n)
    small = a.params["layers"][1]["w"]
    assert small.sharding.shard_shape(small.shape) == small.shape == (256, 3)


def test_no_pauses_apply_each_is_n_sgd_steps_in_worker_order():
  """apply="each" on the same tick: N updates, worker w's gradient (taken at the tick's start) applied w-th."""
  n, lr = 4, 0.05
  batch = _at(_lin_batches(1, n, 4), 0)
  strategy = async_sgd(linear.loss, optax.sgd(lr), None, num_workers=n, apply="each", max_staleness=0)
  state, m = strategy.step(strategy.init(linear.init()), strategy.shard_batch(batch))
  start = linear.init()
  grads = [jax.grad(linear.loss)(start, _at(batch, w)) for w in range(n)]
  expected = jax.tree.map(lambda p, *g: p - lr * sum(g), start, *grads)
  assert_trees_all_close(state.params, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(m["staleness"], np.arange(n))  # earlier updates of the tick count
  assert int(m["updates"]) == n and int(m["sync_round"]) == 1


# (2) reproducible by the init key, and only by it


def test_same_key_same_run_bit_for_bit_other_key_differs():
  strategy = async_sgd(mlp.loss, optax.adam(1e-2), None, num_workers=4, max_staleness=2, pause_prob=0.3,
                       delay=uniform(1, 3), staleness_lr="inverse")
  batches = _mlp_batches(50, 4, 8)
  batches = jax.tree.map(lambda x: np.concatenate([x] * 4), batches)  # 200 ticks, the 50 batches in turn

  def go(key):
    state, m = jdist.scan_steps(strategy, strategy.init(MLP, key=key), batches)
    return jax.device_get((state.params, m))

  (p1, m1), (p2, m2), (p3, m3) = go(7), go(jax.random.key(7)), go(8)
  for a, b in zip(jax.tree.leaves((p1, m1)), jax.tree.leaves((p2, m2))):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(m1["delivered"], m3["delivered"])
  assert not np.array_equal(p1["layers"][0]["w"], p3["layers"][0]["w"])


def test_a_key_is_a_jax_key_its_raw_data_or_an_int_seed_given_to_init_only():
  strategy = async_sgd(linear.loss, optax.sgd(0.1), None, num_workers=2)
  expected = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(3))[0]))  # init splits the key
  for key in (3, jax.random.key(3), jax.random.key_data(jax.random.key(3)), jax.random.PRNGKey(3), np.int64(3),
              jax.numpy.int32(3)):
    np.testing.assert_array_equal(strategy.init(linear.init(), key=key).key, expected)
  np.testing.assert_array_equal(strategy.init(linear.init()).key, strategy.init(linear.init(), key=0).key)
  # a str used to fail with "AttributeError: 'str' object has no attribute 'dtype'"
  message = r"init's key must be a JAX PRNG key \(jax.random.key\(0\)\), raw uint32 key data .* or an int seed, got "
  for bad in ("a", 1.5, True, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0))):
    with pytest.raises(TypeError, match=message):
      strategy.init(linear.init(), key=bad)
  with pytest.raises(TypeError, match="unexpected keyword argument 'key'"):  # randomness comes from init alone
    async_sgd(linear.loss, optax.sgd(0.1), None, num_workers=2, key=0)


# (3) fault tolerance


def test_two_of_four_workers_failed_still_solve_the_article_regression():
  strategy = async_sgd(linear.loss, optax.sgd(0.01), None, num_workers=4, pause_prob=0.05, max_staleness=2,
                       fail={1: 100, 3: 300})
  state, m = jdist.scan_steps(strategy, strategy.init(linear.init()), _article_batches(4, 4000))
  delivered = np.asarray(m["delivered"])
  assert delivered[100:, 1].sum() == 0 and delivered[300:, 3].sum() == 0 and int(m["num_alive"][-1]) == 2
  np.testing.assert_allclose(np.asarray(state.params["w"])[0, 0], 2.0, atol=1e-2)
  np.testing.assert_allclose(np.asarray(state.params["b"])[0], 1.0, atol=1e-2)


@pytest.mark.parametrize("delay,on_mesh,apply", [(None, False, "mean"), (None, True, "each"),
                                                 ("fixed_speeds", True, "mean")])
def test_a_dead_workers_nan_data_is_discarded_not_multiplied_by_zero(delay, on_mesh, apply):
  """Worker 0 fails at tick 0 and its slices are NaN: the run equals a numpy server of workers 1..3
  (its gradient and loss were weighted by 0 before, and 0 * nan made the server parameters NaN)."""
  n, ticks = 4, 6
  batches = _lin_batches(ticks, n, 2, seed=4)
  dirty = jax.tree.map(lambda x: x.copy(), batches)
  dirty["x"][:, 0] = np.nan
  dirty["y"][:, 0] = np.nan
  mesh = jdist.make_mesh(workers=2, devices=jax.devices()[:2]) if on_mesh else None  # 2 workers per device
  kw = {"delay": fixed_speeds([1, 1, 2, 1])} if delay else {}  # worker 2 every other tick: async updates
  strategy = async_sgd(linear.loss, optax.sgd(0.05), mesh, num_workers=n, fail={0: 0}, apply=apply, **kw)
  state, m = jdist.scan_steps(strategy, strategy.init(linear.init()), dirty)
  live = jax.tree.map(lambda x: x[:, 1:], batches)
  masks = np.asarray(m["delivered"]).astype(bool)
  assert not masks[:, 0].any() and masks[:, 1:].all() == (delay is None)
  ref = numpy_server(live, lr=0.05, apply=apply, delivered=masks[:, 1:])
  np.testing.assert_allclose([float(state.params["w"][0, 0]), float(state.params["b"][0])], ref["params"][-1],
                             rtol=1e-5)
  # the loss of the first tick: the mean over the 3 live workers, on the initial (zero) parameters
  x, y = live["x"][0], live["y"][0]
  np.testing.assert_allclose(m["loss"][0], np.mean((0 * x - y) ** 2), rtol=1e-5)
  assert np.isfinite(np.asarray(m["grad_norm"])).all() and np.isfinite(np.asarray(m["loss"])).all()


# (4) bad input: typed errors, checked when the strategy is built (the batch: at shard_batch and step)


def test_bad_input_is_a_typed_error():
  mk = lambda **kw: async_sgd(linear.loss, optax.sgd(0.1), kw.pop("mesh", None), **{"num_workers": 4, **kw})
  cases = [  # (options, the argument named, the value it carries)
      ({"num_workers": 0}, "num_workers", 0), ({"pause_prob": -0.1}, "pause_prob", -0.1),
      ({"pause_prob": 1.0}, "pause_prob", 1.0), ({"max_staleness": -1}, "max_staleness", -1),
      ({"staleness_lr": "linear"}, "staleness_lr", "linear"), ({"apply": "sum"}, "apply", "sum"),
      ({"fail": {4: 10}}, "fail", {4: 10}), ({"fail": {1: -1}}, "fail[1]", -1),
      ({"delay_compensation": -1.0}, "delay_compensation", -1.0),
      ({"delay": fixed_speeds([1, 2, 3])}, "fixed_speeds(periods)", (1, 2, 3)),
      ({"mesh": jdist.make_mesh(workers=8)}, "num_workers", 4),
  ]
  for kw, name, got in cases:
    with pytest.raises(OptionError) as e:
      mk(**kw)
    assert (e.value.name, e.value.got) == (name, got), e.value
  with pytest.raises(OptionTypeError) as e:
    mk(delay=3)
  assert e.value.name == "delay"
  with pytest.raises(jdist.errors.AxisError) as e:
    mk(mesh=jdist.make_mesh(data=8))
  assert e.value.axis == "workers"
  with pytest.raises(TypeError, match="missing 1 required positional argument: 'mesh'"):  # one contract: mesh third
    async_sgd(linear.loss, optax.sgd(0.1), num_workers=4)


def test_bad_batches_are_batch_errors_at_shard_batch_and_step():
  strategy = async_sgd(linear.loss, optax.sgd(0.1), None, num_workers=4)
  state = strategy.init(linear.init())
  flat = linear_regression()  # [8, 1]: a global batch, not [num_workers, b, 1]
  for call in (strategy.shard_batch, lambda b: strategy.step(state, b)):
    with pytest.raises(BatchError, match="split_workers") as e:
      call(flat)
    assert e.value.sizes == {"['x']": 8} and e.value.multiple_of == 4
  with pytest.raises(BatchError) as e:  # scanned, each tick's slice is checked alike
    jdist.scan_steps(strategy, state, jax.tree.map(lambda x: x[None], flat))
  assert e.value.sizes == {"['x']": 8}
  # x has 3 examples per worker, y 1: y used to broadcast against x silently
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(4, 3, 1)).astype(np.float32), "y": rng.normal(size=(4, 1, 1)).astype(np.float32)}
  for call in (strategy.shard_batch, lambda b: strategy.step(state, b)):
    with pytest.raises(BatchError) as e:
      call(batch)
    assert e.value.sizes == {"['x']": 3, "['y']": 1}
  strategy.shard_batch({"x": batch["x"], "w": np.ones(4, np.float32)})  # a leaf of the workers alone has no b
  with pytest.raises(BatchError, match=r"no examples \(b = 0 at axis 1\)"):  # a nan loss the server would apply
    strategy.step(state, jax.tree.map(lambda x: x[:, :0], batch))


def test_numpy_and_jax_scalars_are_numbers_bools_and_strings_are_not():
  # np.float32 / jnp.float32 / np.int64 used to be rejected as "needs a probability in (0, 1], got 0.5"
  mk = lambda **kw: async_sgd(linear.loss, optax.sgd(0.1), None, num_workers=4, **kw)
  runs = []
  for p, lam in ((0.25, 1.0), (np.float32(0.25), np.int64(1)), (jax.numpy.float32(0.25), jax.numpy.int32(1))):
    strategy = mk(pause_prob=p, delay_compensation=lam, delay=geometric(p))
    assert strategy.info["pause_prob"] == 0.25 and strategy.info["delay_compensation"] == 1.0
    assert strategy.info["delay"] == "geometric(0.25)" and type(strategy.info["pause_prob"]) is float
    _, m = jdist.scan_steps(strategy, strategy.init(linear.init()), _article_batches(4, 40))
    runs.append(np.asarray(m["delivered"]))
  # pauses then delays, each 1/4 of the time: a worker delivers 0.75 * 0.25 of the ticks
  assert 0.1 < runs[0].mean() < 0.3
  np.testing.assert_array_equal(runs[1], runs[0])
  np.testing.assert_array_equal(runs[2], runs[0])
  for bad in (True, "0.1", None, np.array([0.1]), jax.numpy.bool_(False)):
    for make, name in ((lambda: mk(pause_prob=bad), "pause_prob"), (lambda: mk(delay_compensation=bad),
                                                                    "delay_compensation"),
                       (lambda: geometric(bad), "geometric(p)")):
      with pytest.raises(OptionTypeError, match="Pass a float or an int") as e:
        make()
      assert e.value.name == name and e.value.got is bad
  with pytest.raises(OptionError) as e:
    geometric(np.float32(0))
  assert e.value.name == "geometric(p)" and e.value.got == 0.0
  with pytest.raises(OptionError) as e:
    mk(delay_compensation=np.float32("nan"))
  assert e.value.name == "delay_compensation" and np.isnan(e.value.got)


def test_the_workers_axis_is_one_mesh_axis_name():
  mk = lambda mesh, **kw: async_sgd(linear.loss, optax.sgd(0.1), mesh, num_workers=4, **kw)
  mesh = jdist.make_mesh(node=2, device=2, devices=jax.devices()[:4])
  for m in (mesh, None):  # was "too many values to unpack", or make_mesh's "keywords must be strings"
    with pytest.raises(ValueError, match=r"async_sgd's workers axis runs over one mesh axis, got "
                                         r"axis=\('node', 'device'\) \(2 names\)\. Pass one name, e.g. axis='node'"):
      mk(m, axis=("node", "device"))
  with pytest.raises(TypeError, match=r"axis must be a mesh axis name \(a str\), got 1 \(int\)"):
    mk(None, axis=1)
  one = jdist.make_mesh(node=1, device=2, devices=jax.devices()[:2])
  assert mk(one, axis=("device",)).mesh.shape["device"] == 2  # a single name in a tuple is fine


def test_split_workers_errors_speak_of_workers():
  # used to blame "devices on the data axis x micro-batches" (jdist.batches.batch_size's wording)
  with pytest.raises(BatchError, match=r"split_workers: the batch has 8 examples, which do not split evenly over "
                                       r"num_workers=3.*a multiple of 3 examples, e.g. 6") as e:
    split_workers(linear_regression(), 3)
  assert e.value.multiple_of == 3
  with pytest.raises(BatchError, match=r"the process-local batch has 5 examples, which do not split evenly over "
                                       r"this process's 2 workers \(num_workers=4 / 2 processes\)"):
    split_workers({"x": np.zeros((5, 1))}, 4, process_count=2)
  with pytest.raises(BatchError, match="batch leaves have different leading sizes"):
    split_workers({"x": np.zeros((8, 1)), "y": np.zeros((4, 1))}, 4)
  np.testing.assert_array_equal(split_workers({"x": np.arange(6)}, 3)["x"], [[0, 1], [2, 3], [4, 5]])


# (5) scanned ticks equal stepped ones; every layout gives one device's numbers


def test_scan_steps_equals_step_by_step_on_a_workers_mesh():
  n, ticks = 4, 25
  mesh = jdist.make_mesh(workers=n, devices=jax.devices()[:n])
  strategy = async_sgd(mlp.loss, optax.adam(1e-2), mesh, num_workers=n, max_staleness=2, pause_prob=0.3,
                       staleness_lr="inverse", delay_compensation=0.1, apply="each")
  batches = _mlp_batches(ticks, n, 8, seed=1)
  stepped = strategy.init(MLP, key=5)
  shardings = jax.tree.map(lambda x: x.sharding, stepped)
  history = []
  for t in range(ticks):
    stepped, m = strategy.step(stepped, strategy.shard_batch(_at(batches, t)))
    history.append(jax.device_get(m))
  assert jax.tree.map(lambda x: x.sharding, stepped) == shardings  # a step keeps the state's placement
  scanned, ms = jdist.scan_steps(strategy, strategy.init(MLP, key=5), batches)
  ms = jax.device_get(ms)
  for k in ("delivered", "pulled", "waiting", "staleness", "clock_staleness", "num_delivered", "sync_round",
            "version"):
    np.testing.assert_array_equal(ms[k], np.stack([h[k] for h in history]), err_msg=k)
  np.testing.assert_allclose(ms["loss"], [h["loss"] for h in history], rtol=1e-6)
  assert_trees_all_close(scanned.params, stepped.params, rtol=1e-6, atol=1e-7)  # bitwise on CPU today
  assert_trees_all_close(scanned.extra, stepped.extra, rtol=1e-6, atol=1e-7)
  assert ms["num_delivered"].min() < n and ms["max_staleness"].max() > 0  # not trivially synchronous
  assert ms["num_waiting"].max() > 0


def test_several_workers_per_device_give_the_numbers_of_one_device():
  """N = 4 workers on 2 devices (2 each: vmap inside shard_map, gradients fetched across devices). The mean rule
  on such a mesh: test_a_dead_workers_nan_data_is_discarded_not_multiplied_by_zero[fixed_speeds-True-mean]."""
  kw = dict(num_workers=4, max_staleness=1, pause_prob=0.3, staleness_lr="inverse", delay_compensation=0.1,
            apply="each")
  batches = _mlp_batches(15, 4, 8, seed=2)
  runs = []
  for mesh in (None, jdist.make_mesh(workers=2, devices=jax.devices()[:2])):
    strategy = async_sgd(mlp.loss, optax.adam(1e-2), mesh, **kw)
    state, m = jdist.scan_steps(strategy, strategy.init(MLP, key=2), batches)
    runs.append(jax.device_get((state.params, m)))
  (p1, m1), (p2, m2) = runs
  np.testing.assert_array_equal(m1["delivered"], m2["delivered"])
  np.testing.assert_array_equal(m1["staleness"], m2["staleness"])
  assert m1["max_staleness"].max() > 0 and m1["sync_round"].min() == 0
  assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)


def test_the_split_server_runs_any_optimizer_as_one_device_does():
  """The server's state is split over the workers axis; an optimizer that looks across a whole leaf (adafactor's
  factored moments) or across all of them (a global-norm clip) still computes what one device computes."""
  opt = lambda: optax.chain(optax.clip_by_global_norm(0.05), optax.adafactor(1e-2, min_dim_size_to_factor=4))
  batches = _mlp_batches(12, 4, 8, seed=4)
  runs = []
  for mesh in (None, jdist.make_mesh(workers=4, devices=jax.devices()[:4])):
    strategy = async_sgd(mlp.loss, opt(), mesh, num_workers=4, pause_prob=0.4, apply="each")
    start = strategy.init(MLP, key=4)
    shardings = jax.tree.map(lambda x: x.sharding, start)
    state, m = jdist.scan_steps(strategy, start, batches)
    # the scan leaves the state as init placed it (adafactor's factored moments whole), so nothing compiles again
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    runs.append(jax.device_get((state.params, state.opt_state, m)))
  (p1, o1, m1), (p2, o2, m2) = runs
  np.testing.assert_array_equal(m1["delivered"], m2["delivered"])
  assert m1["sync_round"].min() == 0 and m1["grad_norm"].max() > 0.05  # asynchronous ticks, and the clip acts
  assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)
  assert_trees_all_close(o2, o1, rtol=1e-5, atol=1e-6)


# (6) metrics, delay models, fit, the example


def test_aux_metrics_are_averaged_over_alive_workers():
  strategy = async_sgd(mlp.loss_and_accuracy, optax.sgd(0.1), jdist.make_mesh(workers=2, devices=jax.devices()[:2]),
                       num_workers=4, has_aux=True, fail={0: 0})
  batch = _at(_mlp_batches(1, 4, 8), 0)
  _, m = strategy.step(strategy.init(MLP), strategy.shard_batch(batch))
  accuracy = [float(mlp.accuracy(MLP, _at(batch, w))) for w in range(1, 4)]  # worker 0 never ran
  np.testing.assert_allclose(m["accuracy"], np.mean(accuracy), rtol=1e-6)
  assert int(m["num_delivered"]) == 3 and int(m["sync_round"]) == 1


def test_integer_aux_is_a_float_mean_over_alive_workers():
  def loss_and_count(params, batch):
    return mlp.loss(params, batch), {"positives": jax.numpy.sum(batch["y"] > 0)}

  strategy = async_sgd(loss_and_count, optax.sgd(0.1), jdist.make_mesh(workers=2, devices=jax.devices()[:2]),
                       num_workers=4, has_aux=True, fail={0: 0})
  batch = _at(_mlp_batches(1, 4, 8), 0)
  _, m = strategy.step(strategy.init(MLP), strategy.shard_batch(batch))
  counts = [int(np.sum(_at(batch, w)["y"] > 0)) for w in range(1, 4)]  # worker 0 never ran
  np.testing.assert_allclose(float(m["positives"]), np.mean(counts), rtol=1e-6)  # was cast to int: 0


def test_a_delay_mask_that_is_not_bool_num_workers_is_an_error_when_built():
  mk = lambda delay: async_sgd(linear.loss, optax.sgd(0.1), None, num_workers=4, delay=delay)
  jnp = jax.numpy
  # (3,) used to fail at the first step with a broadcasting error; (1,) and () broadcast silently
  for shape in ((3,), (1,), (), (4, 1)):
    with pytest.raises(ValueError, match=rf"The delay <lambda> gave a mask of shape \({shape[0] if shape else ''}.*"
                                         r"for num_workers=4; it must be bool\[4\], one entry per worker"):
      mk(lambda key, tick, n, shape=shape: jnp.ones(shape, bool))
  with pytest.raises(TypeError, match=r"gave a mask of dtype float32; it must be bool\[4\]"):
    mk(lambda key, tick, n: jax.random.uniform(key, (n,)))
  growing = DelayModel(lambda key, n: jnp.zeros((n,), jnp.int32),
                       lambda s, key, tick, computing: (s >= 0, s[:1]), "growing")
  with pytest.raises(ValueError, match="The delay model growing's finish returned the delay state"):
    mk(growing)
  # a plain function works too (round robin), and an integer mask counts nonzero as True
  ints = lambda key, tick, n: (jnp.arange(n) == tick % n).astype(jnp.int32) * 3
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), None, num_workers=2, delay=ints)
  _, m = jdist.scan_steps(strategy, strategy.init(linear.init()), _article_batches(2, 6))
  np.testing.assert_array_equal(np.asarray(m["delivered"]), [[1, 0], [0, 1]] * 3)


def test_fit_runs_the_async_strategy_and_info_is_read_only():
  strategy = async_sgd(linear.loss, optax.sgd(0.01), None, num_workers=4, pause_prob=0.2)
  data = [split_workers(linear_regression(), 4)] * 30
  result = jdist.fit(strategy, strategy.init(linear.init()), data, steps=30, tensorboard=False)
  assert int(result.state.step) == 30 and result.history[-1]["loss"] < result.history[0]["loss"]
  assert {"num_delivered", "max_staleness", "mean_staleness", "num_waiting", "updates"} <= set(result.history[-1])
  assert type(strategy) is jdist.Strategy and strategy.name.startswith("async_sgd[N=4,apply=mean")
  assert strategy.info["apply"] == "mean" and strategy._replace(name="x").info == strategy.info
  with pytest.raises(TypeError):
    strategy.info["apply"] = "each"


def test_example_runs_quickly(tmp_path):
  from tests.test_examples import load_example

  example = load_example("async_sgd")
  results = example.run(ticks=40, out=str(tmp_path), verbose=True, bounds=(4,), keys=(0,), rules=("each",),
                        linear_ticks=3000)
  np.testing.assert_allclose(results["linear_regression"]["w"], 2.0, atol=1e-2)
  np.testing.assert_allclose(results["linear_regression"]["b"], 1.0, atol=1e-2)
  assert set(results["digits"]) == {("each", 4)}
  assert all(r["final_loss"][0] < r["first_loss"][0] for r in results["digits"].values())
  assert (tmp_path / "async_sgd.png").exists()
  # --out as named: a .png path is the file (its folder made), anything else a folder that gets async_sgd.png
  assert example.plot_path(str(tmp_path / "plots" / "curves.PNG")) == tmp_path / "plots" / "curves.PNG"
  assert example.plot_path("runs/x") == pathlib.Path("runs/x/async_sgd.png")
  example.plot(results["digits"], example.plot_path(str(tmp_path / "plots" / "a.png")))
  assert (tmp_path / "plots" / "a.png").is_file()


def test_strategy_seed_varies_the_schedule_not_the_parameters_through_the_cli(tmp_path):
  """jdist train with strategy.seed = 1 and 2: the same initial parameters (the first tick's loss, every worker on
  its copy of them, is equal), different pause schedules; train.seed, the parameters' seed, changes that loss."""
  from jdist import config as config_lib
  from jdist.cli import main
  from jdist.experiment import build
  from jdist.train import read_jsonl

  config = tmp_path / "async.toml"
  config.write_text('[model]\nhidden = [16]\n[data]\nbatch_size = 64\n[optimizer]\nname = "sgd"\nlr = 0.1\n'
                    '[strategy]\nname = "async_sgd"\nnum_workers = 4\npause_prob = 0.5\nmax_staleness = 1\nseed = 1\n'
                    '[mesh]\nworkers = 1\nnum_devices = 1\n[train]\nsteps = 12\nlog_every = 1\neval_every = 12\n'
                    'progress = false\n[checkpoint]\nenabled = false\n')
  runs = {}
  for name, sets in (("seed1", []), ("seed2", ["--set", "strategy.seed=2"])):
    assert main(["train", str(config), "--quiet", "--set", f"run_dir={tmp_path / name}", *sets]) == 0
    records = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "num_delivered" in r]
    runs[name] = (records[0]["loss"], [r["num_delivered"] for r in records])
  assert runs["seed1"][0] == runs["seed2"][0] and runs["seed1"][1] != runs["seed2"][1]
  # the states the CLI built: the same parameters under either strategy.seed, others under another train.seed
  states = [build(config_lib.load(config, sets)).state for sets in ([], ["strategy.seed=2"], ["train.seed=5"])]
  assert_trees_all_close(states[1].params, states[0].params, rtol=0, atol=0)
  assert not np.array_equal(states[2].params["layers"][0]["w"], states[0].params["layers"][0]["w"])
  assert not np.array_equal(states[1].key, states[0].key) and np.array_equal(states[2].key, states[0].key)
