"""Emulated asynchronous SGD: zero staleness is data parallelism, the bound holds, runs repeat by seed,
and the staleness-aware steps match a hand-written numpy parameter server."""
import jax
import numpy as np
import optax
import pytest

import jdist
from jdist.datasets import linear_regression
from jdist.models import linear, mlp
from jdist.strategies.async_sgd import (
  DelayModel,
  async_sgd,
  fixed_speeds,
  geometric,
  split_workers,
  uniform,
)
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


def _article_batches(workers):
  """The article's 8 points split over the workers, as one tick's batch with a leading tick axis of 1."""
  return jax.tree.map(lambda x: x[None], split_workers(linear_regression(), workers))


# (1) zero staleness is synchronous data parallelism


@pytest.mark.parametrize("opt,on_mesh", [("sgd", False), ("adam", False), ("adam", True), ("plateau", True)])
def test_no_pauses_every_tick_equals_data_parallel_on_the_union(opt, on_mesh):
  make = {"sgd": lambda: optax.sgd(0.1), "adam": lambda: optax.adam(1e-2),  # plateau: update(..., value=loss)
          "plateau": lambda: optax.chain(optax.sgd(0.5), optax.contrib.reduce_on_plateau(patience=1, rtol=0.2))}[opt]
  n, ticks = 4, 20
  devices = jax.devices()[:n]
  mesh = jdist.make_mesh(workers=n, devices=devices) if on_mesh else None
  ours = async_sgd(mlp.loss, make(), num_workers=n, mesh=mesh, key=0)
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


# (2) bounded staleness over 10,000 ticks of random pauses


def _independent_clock_checks(delivered, alive, s):
  """From the delivery masks alone: the clock spread of alive workers and each gradient's clock
  staleness (its clock minus the slowest alive clock when its worker pulled)."""
  ticks, n = delivered.shape
  clocks = np.cumsum(delivered, axis=0)  # after each tick
  big = np.iinfo(np.int64).max
  lo = np.where(alive, clocks, big).min(1)
  hi = np.where(alive, clocks, -1).max(1)
  spread = np.where(alive.any(1), hi - lo, 0)
  assert spread.max() <= s, spread.max()
  base = np.zeros(n, np.int64)  # slowest alive clock at each worker's last pull
  worst = 0
  for t in range(ticks):
    for w in np.flatnonzero(delivered[t]):
      worst = max(worst, (clocks[t, w] - 1) - base[w])
    base[delivered[t]] = lo[t]
  assert worst <= s, worst
  return spread.max(), worst


@pytest.mark.parametrize("s", [0, 1, 3])
def test_max_staleness_bounds_clocks_over_10000_ticks(s):
  n, ticks, fail_at = 4, 10_000, 6_000
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), num_workers=n, max_staleness=s, pause_prob=0.5,
                       fail={3: fail_at}, key=s)
  state, m = strategy.run(strategy.init(linear.init()), _article_batches(n), ticks)
  delivered = np.asarray(m["delivered"]).astype(bool)
  alive = np.ones((ticks, n), bool)
  alive[fail_at:, 3] = False
  np.testing.assert_array_equal(np.asarray(m["num_alive"]), alive.sum(1))
  assert not delivered[fail_at:, 3].any()
  spread, worst = _independent_clock_checks(delivered, alive, s)
  assert spread == s and worst == s  # the bound is reached, and held
  assert np.asarray(m["clock_spread"]).max() == s and np.asarray(m["max_clock_staleness"]).max() == s
  staleness = np.asarray(m["staleness"])
  assert (staleness[~delivered] == -1).all()
  assert staleness.max() <= (n - 1) * (2 * s + 1)  # in server updates: each other worker, at most 2s + 1
  if s == 0:  # synchronous: every delivering tick is one averaged round of every alive worker
    assert staleness.max() == 0
    np.testing.assert_array_equal(np.asarray(m["sync_round"]), delivered.any(1))
    np.testing.assert_array_equal(delivered.sum(1)[delivered.any(1)], alive.sum(1)[delivered.any(1)])
  # the failed worker does not hold the others back: they go on delivering
  assert delivered[-1000:, :3].sum() > 500
  assert not np.isnan(np.asarray(m["loss"])).any()


def test_without_bound_clocks_drift_apart():
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), num_workers=4, pause_prob=0.5, key=0)
  _, m = strategy.run(strategy.init(linear.init()), _article_batches(4), 2000)
  assert np.asarray(m["clock_spread"]).max() > 3 and np.asarray(m["sync_round"]).sum() > 0


# (3) reproducible by seed


def test_same_key_same_run_bit_for_bit_other_key_differs():
  strategy = async_sgd(mlp.loss, optax.adam(1e-2), num_workers=4, max_staleness=2, pause_prob=0.3,
                       delay=uniform(1, 3), staleness_lr="inverse", key=7)
  batches = _mlp_batches(50, 4, 8)

  def go(**init_kw):
    state, m = strategy.run(strategy.init(MLP, **init_kw), batches, 200)
    return jax.device_get((state.params, m))

  (p1, m1), (p2, m2), (p3, m3) = go(), go(key=7), go(key=8)
  for a, b in zip(jax.tree.leaves((p1, m1)), jax.tree.leaves((p2, m2))):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(m1["delivered"], m3["delivered"])
  assert not np.array_equal(p1["layers"][0]["w"], p3["layers"][0]["w"])


# (4) staleness-aware steps against a numpy parameter server


def _numpy_parameter_server(batches, masks, *, lr, momentum, lam, inverse):
  """A hand-written server for y = x w + b with SGD + momentum; returns params and staleness per tick."""
  x, y = np.asarray(batches["x"], np.float64), np.asarray(batches["y"], np.float64)
  ticks, n = masks.shape

  def grad(p, t, w):
    err = x[t, w, :, 0] * p[0] + p[1] - y[t, w, :, 0]
    return np.array([2 * np.mean(err * x[t, w, :, 0]), 2 * np.mean(err)])

  server, trace = np.zeros(2), np.zeros(2)
  copies, pulled, version = [server.copy() for _ in range(n)], np.zeros(n, int), 0
  history, stale = [], []
  for t in range(ticks):
    d = masks[t]
    tau = np.where(d, version - pulled, -1)
    if d.all() and (tau == 0).all():  # a synchronous round: one averaged update
      trace = np.mean([grad(server, t, w) for w in range(n)], 0) + momentum * trace
      server = server - lr * trace
      version += 1
    else:
      for w in np.flatnonzero(d):
        tau[w] = version - pulled[w]
        g = grad(copies[w], t, w)
        g = g + lam * g * g * (server - copies[w])
        trace = g + momentum * trace
        server = server - lr * trace / (max(1, tau[w]) if inverse else 1)
        version += 1
    for w in np.flatnonzero(d):
      copies[w], pulled[w] = server.copy(), version
    history.append(server.copy())
    stale.append(tau)
  return np.array(history), np.array(stale)


@pytest.mark.parametrize("schedule,inverse,lam", [("fixed_speeds", True, 0.0), ("fixed_speeds", False, 0.5),
                                                  ("random_pauses", True, 0.5)])
def test_staleness_lr_and_delay_compensation_match_numpy_server(schedule, inverse, lam):
  n, ticks = 3, 30
  batches = _lin_batches(ticks, n, 4)
  kw = {"delay": fixed_speeds([1, 2, 3])} if schedule == "fixed_speeds" else {"pause_prob": 0.4}
  strategy = async_sgd(linear.loss, optax.sgd(0.05, momentum=0.9), num_workers=n,
                       staleness_lr="inverse" if inverse else None, delay_compensation=lam, key=3, **kw)
  state = strategy.init(linear.init())
  params, masks, stale = [], [], []
  for t in range(ticks):
    state, m = strategy.step(state, strategy.shard_batch(_at(batches, t)))
    params.append([float(state.params["w"][0, 0]), float(state.params["b"][0])])
    masks.append(np.asarray(m["delivered"]).astype(bool))
    stale.append(np.asarray(m["staleness"]))
  masks = np.array(masks)
  if schedule == "fixed_speeds":  # the numpy server gets the masks from the rule, not from us
    expected_masks = np.array([[(t + 1) % p == 0 for p in (1, 2, 3)] for t in range(ticks)])
    np.testing.assert_array_equal(masks, expected_masks)
  else:
    assert 0 < masks.sum() < masks.size
  ref, ref_stale = _numpy_parameter_server(batches, masks, lr=0.05, momentum=0.9, lam=lam, inverse=inverse)
  np.testing.assert_array_equal(np.array(stale), ref_stale)
  assert np.array(stale).max() >= 2  # staleness did happen
  np.testing.assert_allclose(np.array(params), ref, rtol=1e-4, atol=1e-5)


# (5) fault tolerance


def test_two_of_four_workers_failed_still_solve_the_article_regression():
  strategy = async_sgd(linear.loss, optax.sgd(0.01), num_workers=4, pause_prob=0.05, max_staleness=2,
                       fail={1: 100, 3: 300}, key=0)
  state, m = strategy.run(strategy.init(linear.init()), _article_batches(4), 4000)
  delivered = np.asarray(m["delivered"])
  assert delivered[100:, 1].sum() == 0 and delivered[300:, 3].sum() == 0 and int(m["num_alive"][-1]) == 2
  np.testing.assert_allclose(np.asarray(state.params["w"])[0, 0], 2.0, atol=1e-2)
  np.testing.assert_allclose(np.asarray(state.params["b"])[0], 1.0, atol=1e-2)


@pytest.mark.parametrize("delay,on_mesh", [(None, False), (None, True), ("fixed_speeds", True)])
def test_a_dead_workers_nan_data_is_discarded_not_multiplied_by_zero(delay, on_mesh):
  """Worker 0 fails at tick 0 and its slices are NaN: the run equals a numpy server of workers 1..3
  (its gradient and loss were weighted by 0 before, and 0 * nan made the server parameters NaN)."""
  n, ticks = 4, 6
  batches = _lin_batches(ticks, n, 2, seed=4)
  dirty = jax.tree.map(lambda x: x.copy(), batches)
  dirty["x"][:, 0] = np.nan
  dirty["y"][:, 0] = np.nan
  mesh = jdist.make_mesh(workers=2, devices=jax.devices()[:2]) if on_mesh else None  # 2 workers per device
  kw = {"delay": fixed_speeds([1, 1, 2, 1])} if delay else {}  # worker 2 every other tick: async updates
  strategy = async_sgd(linear.loss, optax.sgd(0.05), num_workers=n, mesh=mesh, fail={0: 0}, key=0, **kw)
  state, m = strategy.run(strategy.init(linear.init()), dirty, ticks)
  live = jax.tree.map(lambda x: x[:, 1:], batches)
  masks = np.asarray(m["delivered"]).astype(bool)
  assert not masks[:, 0].any() and masks[:, 1:].all() == (delay is None)
  ref, _ = _numpy_parameter_server(live, masks[:, 1:], lr=0.05, momentum=0.0, lam=0.0, inverse=False)
  np.testing.assert_allclose([float(state.params["w"][0, 0]), float(state.params["b"][0])], ref[-1], rtol=1e-5)
  # the loss of the first tick: the mean over the 3 live workers, on the initial (zero) parameters
  x, y = live["x"][0], live["y"][0]
  np.testing.assert_allclose(m["loss"][0], np.mean((0 * x - y) ** 2), rtol=1e-5)
  assert np.isfinite(np.asarray(m["grad_norm"])).all() and np.isfinite(np.asarray(m["loss"])).all()


# (6) bad input


def test_bad_input_is_a_clear_error():
  mk = lambda **kw: async_sgd(linear.loss, optax.sgd(0.1), **{"num_workers": 4, "key": 0, **kw})
  with pytest.raises(ValueError, match="num_workers must be a positive int.*got 0"):
    mk(num_workers=0)
  for p in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"pause_prob must be a probability in \[0, 1\)"):
      mk(pause_prob=p)
  with pytest.raises(ValueError, match="max_staleness must be None .* or an int >= 0.*got -1"):
    mk(max_staleness=-1)
  with pytest.raises(ValueError, match="Unknown staleness_lr: 'linear'. It needs to be None or one of"):
    mk(staleness_lr="linear")
  with pytest.raises(ValueError, match=r"fail names worker 4, but the workers are 0..3"):
    mk(fail={4: 10})
  with pytest.raises(ValueError, match="delay_compensation must be a number >= 0"):
    mk(delay_compensation=-1.0)
  with pytest.raises(ValueError, match="fixed_speeds got 3 periods but there are 4 workers"):
    mk(delay=fixed_speeds([1, 2, 3]))
  with pytest.raises(TypeError, match="delay must be None, a DelayModel"):
    mk(delay=3)
  with pytest.raises(ValueError, match=r"num_workers \(4\) is not divisible by the 8 devices on mesh axis 'workers'"):
    mk(mesh=jdist.make_mesh(workers=8))
  with pytest.raises(ValueError, match="workers axis 'workers' is not an axis of the mesh"):
    mk(mesh=jdist.make_mesh(data=8))
  strategy = mk()
  state = strategy.init(linear.init())
  flat = linear_regression()  # [8, 1]: a global batch, not [num_workers, b, 1]
  with pytest.raises(ValueError, match=r"axis 0 of size 8 \(shape \(8, 1\)\), but num_workers is 4"):
    strategy.shard_batch(flat)
  with pytest.raises(ValueError, match="num_workers is 4.*split_workers"):
    strategy.step(state, flat)
  with pytest.raises(ValueError, match=r"axis 1 of size 8 .*num_workers is 4"):
    strategy.run(state, jax.tree.map(lambda x: x[None], flat), 3)
  with pytest.raises(ValueError, match="ticks must be a positive int"):
    strategy.run(state, _article_batches(4), 0)
  with pytest.raises(ValueError, match=r"batches have no ticks \(T = 0 along axis 0\)"):
    strategy.run(state, jax.tree.map(lambda x: x[:0], _article_batches(4)), 3)


def test_numpy_and_jax_scalars_are_numbers_bools_and_strings_are_not():
  # np.float32 / jnp.float32 / np.int64 used to be rejected as "needs a probability in (0, 1], got 0.5"
  mk = lambda **kw: async_sgd(linear.loss, optax.sgd(0.1), **{"num_workers": 4, "key": 0, **kw})
  runs = []
  for p, lam in ((0.25, 1.0), (np.float32(0.25), np.int64(1)), (jax.numpy.float32(0.25), jax.numpy.int32(1))):
    strategy = mk(pause_prob=p, delay_compensation=lam, delay=geometric(p))
    assert strategy.info["pause_prob"] == 0.25 and strategy.info["delay_compensation"] == 1.0
    assert strategy.info["delay"] == "geometric(0.25)" and type(strategy.info["pause_prob"]) is float
    _, m = strategy.run(strategy.init(linear.init()), _article_batches(4), 40)
    runs.append(np.asarray(m["delivered"]))
  # pauses then delays, each 1/4 of the time: a worker delivers 0.75 * 0.25 of the ticks
  assert 0.1 < runs[0].mean() < 0.3
  np.testing.assert_array_equal(runs[1], runs[0])
  np.testing.assert_array_equal(runs[2], runs[0])
  for bad in (True, "0.1", None, np.array([0.1]), jax.numpy.bool_(False)):
    with pytest.raises(TypeError, match=r"pause_prob must be a real number, got .*Pass a float or an int"):
      mk(pause_prob=bad)
    with pytest.raises(TypeError, match=r"delay_compensation must be a real number, got"):
      mk(delay_compensation=bad)
    with pytest.raises(TypeError, match=r"geometric\(p\) must be a real number, got"):
      geometric(bad)
  with pytest.raises(ValueError, match=r"geometric\(p\) needs a probability in \(0, 1\], got 0.0"):
    geometric(np.float32(0))
  with pytest.raises(ValueError, match="delay_compensation must be a number >= 0.*got nan"):
    mk(delay_compensation=np.float32("nan"))


def test_the_workers_axis_is_one_mesh_axis_name():
  mk = lambda **kw: async_sgd(linear.loss, optax.sgd(0.1), **{"num_workers": 4, "key": 0, **kw})
  mesh = jdist.make_mesh(node=2, device=2, devices=jax.devices()[:4])
  for m in (mesh, None):  # was "too many values to unpack", or make_mesh's "keywords must be strings"
    with pytest.raises(ValueError, match=r"async_sgd's workers axis runs over one mesh axis, got "
                                         r"axis=\('node', 'device'\) \(2 names\)\. Pass one name, e.g. axis='node'"):
      mk(mesh=m, axis=("node", "device"))
  with pytest.raises(TypeError, match=r"axis must be a mesh axis name \(a str\), got 1 \(int\)"):
    mk(axis=1)
  one = jdist.make_mesh(node=1, device=2, devices=jax.devices()[:2])
  assert mk(mesh=one, axis=("device",)).mesh.shape["device"] == 2  # a single name in a tuple is fine


def test_split_workers_errors_speak_of_workers():
  # used to blame "devices on the data axis x micro-batches" (jdist.batches.batch_size's wording)
  with pytest.raises(ValueError, match=r"split_workers: the batch has 8 examples, which do not split evenly over "
                                       r"num_workers=3.*a multiple of 3 examples, e.g. 6"):
    split_workers(linear_regression(), 3)
  with pytest.raises(ValueError, match=r"the process-local batch has 5 examples, which do not split evenly over "
                                       r"this process's 2 workers \(num_workers=4 / 2 processes\)"):
    split_workers({"x": np.zeros((5, 1))}, 4, process_count=2)
  with pytest.raises(ValueError, match="batch leaves have different leading sizes"):
    split_workers({"x": np.zeros((8, 1)), "y": np.zeros((4, 1))}, 4)
  np.testing.assert_array_equal(split_workers({"x": np.arange(6)}, 3)["x"], [[0, 1], [2, 3], [4, 5]])


def test_a_key_is_a_jax_key_its_raw_data_or_an_int_seed():
  mk = lambda key: async_sgd(linear.loss, optax.sgd(0.1), num_workers=2, key=key)
  expected = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(3))[0]))  # init splits the key
  strategy = mk(3)
  assert_trees_all_close(strategy.init(linear.init()).key, expected, rtol=0, atol=0)
  for key in (jax.random.key(3), jax.random.key_data(jax.random.key(3)), jax.random.PRNGKey(3), np.int64(3),
              jax.numpy.int32(3)):
    np.testing.assert_array_equal(strategy.init(linear.init(), key=key).key, expected)
    np.testing.assert_array_equal(mk(key).init(linear.init()).key, expected)
  # a str used to fail with "AttributeError: 'str' object has no attribute 'dtype'"
  message = r"key must be a JAX PRNG key \(jax.random.key\(0\)\), raw uint32 key data .* or an int seed, got "
  for bad in ("a", 1.5, True, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0))):
    with pytest.raises(TypeError, match=message):
      mk(bad)
  with pytest.raises(TypeError, match="init's " + message + "'a'"):
    strategy.init(linear.init(), key="a")


def test_batch_leaves_that_disagree_on_the_per_worker_batch_size_are_an_error():
  # x has 3 examples per worker, y 1: y used to broadcast against x silently
  strategy = async_sgd(linear.loss, optax.sgd(0.1), num_workers=4, key=0)
  state = strategy.init(linear.init())
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(4, 3, 1)).astype(np.float32), "y": rng.normal(size=(4, 1, 1)).astype(np.float32)}
  different = r"batch leaves have different per-worker batch sizes b at axis 1 \(\['x'\]: 3, \['y'\]: 1\)"
  with pytest.raises(ValueError, match=different):
    strategy.shard_batch(batch)
  with pytest.raises(ValueError, match=different):
    strategy.step(state, batch)
  with pytest.raises(ValueError, match=r"batches leaves have different per-worker batch sizes b at axis 2"):
    strategy.run(state, jax.tree.map(lambda x: x[None], batch), 2)
  # a leaf of the workers alone (one value per worker) has no examples to disagree on
  strategy.shard_batch({"x": batch["x"], "w": np.ones(4, np.float32)})
  empty = jax.tree.map(lambda x: x[:, :0], batch)  # workers with no examples: a nan loss the server would apply
  with pytest.raises(ValueError, match=r"batch give\(s\) each worker no examples \(b = 0 at axis 1\)"):
    strategy.step(state, empty)
  with pytest.raises(ValueError, match=r"batches give\(s\) each worker no examples \(b = 0 at axis 2\)"):
    strategy.run(state, jax.tree.map(lambda x: x[None], empty), 2)


# (7) run() scans ticks and equals stepping, placement included


def test_run_equals_step_by_step_on_a_workers_mesh():
  n, ticks = 4, 25
  mesh = jdist.make_mesh(workers=n, devices=jax.devices()[:n])
  strategy = async_sgd(mlp.loss, optax.adam(1e-2), num_workers=n, mesh=mesh, max_staleness=2, pause_prob=0.3,
                       staleness_lr="inverse", delay_compensation=0.1, key=5)
  batches = _mlp_batches(ticks, n, 8, seed=1)
  stepped = strategy.init(MLP)
  shardings = jax.tree.map(lambda x: x.sharding, stepped)
  history = []
  for t in range(ticks):
    stepped, m = strategy.step(stepped, strategy.shard_batch(_at(batches, t)))
    history.append(jax.device_get(m))
  assert jax.tree.map(lambda x: x.sharding, stepped) == shardings  # a step keeps the state's placement
  scanned, ms = strategy.run(strategy.init(MLP), batches, ticks)
  ms = jax.device_get(ms)
  for k in ("delivered", "staleness", "clock_staleness", "num_delivered", "sync_round", "version"):
    np.testing.assert_array_equal(ms[k], np.stack([h[k] for h in history]), err_msg=k)
  np.testing.assert_allclose(ms["loss"], [h["loss"] for h in history], rtol=1e-6)
  assert_trees_all_close(scanned.params, stepped.params, rtol=1e-6, atol=1e-7)  # bitwise on CPU today
  assert_trees_all_close(scanned.extra, stepped.extra, rtol=1e-6, atol=1e-7)
  assert ms["num_delivered"].min() < n and ms["max_staleness"].max() > 0  # not trivially synchronous


def test_several_workers_per_device_give_the_numbers_of_one_device():
  """N = 4 workers on 2 devices (2 each: vmap inside shard_map, gradients fetched across devices)."""
  kw = dict(num_workers=4, max_staleness=1, pause_prob=0.3, staleness_lr="inverse", delay_compensation=0.1, key=2)
  batches = _mlp_batches(15, 4, 8, seed=2)
  runs = []
  for mesh in (None, jdist.make_mesh(workers=2, devices=jax.devices()[:2])):
    strategy = async_sgd(mlp.loss, optax.adam(1e-2), mesh=mesh, **kw)
    state, m = strategy.run(strategy.init(MLP), batches, 15)
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
  kw = dict(num_workers=4, pause_prob=0.4, key=4)
  batches = _mlp_batches(12, 4, 8, seed=4)
  runs = []
  for mesh in (None, jdist.make_mesh(workers=4, devices=jax.devices()[:4])):
    strategy = async_sgd(mlp.loss, opt(), mesh=mesh, **kw)
    start = strategy.init(MLP)
    shardings = jax.tree.map(lambda x: x.sharding, start)
    state, m = strategy.run(start, batches, 12)
    # run leaves the state as init placed it (adafactor's factored moments whole), so nothing compiles again
    assert jax.tree.map(lambda x: x.sharding, state) == shardings
    runs.append(jax.device_get((state.params, state.opt_state, m)))
  (p1, o1, m1), (p2, o2, m2) = runs
  np.testing.assert_array_equal(m1["delivered"], m2["delivered"])
  assert m1["sync_round"].min() == 0 and m1["grad_norm"].max() > 0.05  # asynchronous ticks, and the clip acts
  assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-6)
  assert_trees_all_close(o2, o1, rtol=1e-5, atol=1e-6)


def test_aux_metrics_are_averaged_over_alive_workers():
  strategy = async_sgd(mlp.loss_and_accuracy, optax.sgd(0.1), num_workers=4, has_aux=True, fail={0: 0},
                       mesh=jdist.make_mesh(workers=2, devices=jax.devices()[:2]), key=0)
  batch = _at(_mlp_batches(1, 4, 8), 0)
  _, m = strategy.step(strategy.init(MLP), strategy.shard_batch(batch))
  accuracy = [float(mlp.accuracy(MLP, _at(batch, w))) for w in range(1, 4)]  # worker 0 never ran
  np.testing.assert_allclose(m["accuracy"], np.mean(accuracy), rtol=1e-6)
  assert int(m["num_delivered"]) == 3 and int(m["sync_round"]) == 1


def test_integer_aux_is_a_float_mean_over_alive_workers():
  def loss_and_count(params, batch):
    return mlp.loss(params, batch), {"positives": jax.numpy.sum(batch["y"] > 0)}

  strategy = async_sgd(loss_and_count, optax.sgd(0.1), num_workers=4, has_aux=True, fail={0: 0},
                       mesh=jdist.make_mesh(workers=2, devices=jax.devices()[:2]), key=0)
  batch = _at(_mlp_batches(1, 4, 8), 0)
  _, m = strategy.step(strategy.init(MLP), strategy.shard_batch(batch))
  counts = [int(np.sum(_at(batch, w)["y"] > 0)) for w in range(1, 4)]  # worker 0 never ran
  np.testing.assert_allclose(float(m["positives"]), np.mean(counts), rtol=1e-6)  # was cast to int: 0


def test_delay_models():
  def masks(delay, n, ticks=1500):
    strategy = async_sgd(linear.loss, optax.sgd(1e-3), num_workers=n, delay=delay, key=1)
    _, m = strategy.run(strategy.init(linear.init()), _article_batches(n), ticks)
    return np.asarray(m["delivered"]).astype(bool)

  gaps = np.diff(np.flatnonzero(masks(uniform(2, 4), 2)[:, 0]))
  assert set(gaps) == {2, 3, 4} and abs(gaps.mean() - 3) < 0.2
  assert abs(masks(geometric(0.25), 2).mean() - 0.25) < 0.04
  custom = lambda key, tick, n: jax.numpy.arange(n) == tick % n  # a plain function works too: round robin
  np.testing.assert_array_equal(masks(custom, 2, 6), [[1, 0], [0, 1]] * 3)


def test_a_delay_mask_that_is_not_bool_num_workers_is_an_error_when_built():
  mk = lambda delay: async_sgd(linear.loss, optax.sgd(0.1), num_workers=4, delay=delay, key=0)
  jnp = jax.numpy
  # (3,) used to fail at the first step with a broadcasting error; (1,) and () broadcast silently
  for shape in ((3,), (1,), (), (4, 1)):
    with pytest.raises(ValueError, match=rf"The delay <lambda> gave a mask of shape \({shape[0] if shape else ''}.*"
                                         r"for num_workers=4; it must be bool\[4\], one entry per worker"):
      mk(lambda key, tick, n, shape=shape: jnp.ones(shape, bool))
  with pytest.raises(TypeError, match=r"gave a mask of dtype float32; it must be bool\[4\]"):
    mk(lambda key, tick, n: jax.random.uniform(key, (n,)))
  growing = DelayModel(lambda key, n: jnp.zeros((n,), jnp.int32),
                       lambda s, key, tick, n: (s >= 0, s[:1]), "growing")
  with pytest.raises(ValueError, match="The delay model growing's finish returned the delay state"):
    mk(growing)
  # an integer mask counts nonzero as True: the same round robin as the bool one
  ints = lambda key, tick, n: (jnp.arange(n) == tick % n).astype(jnp.int32) * 3
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), num_workers=2, delay=ints, key=1)
  _, m = strategy.run(strategy.init(linear.init()), _article_batches(2), 6)
  np.testing.assert_array_equal(np.asarray(m["delivered"]), [[1, 0], [0, 1]] * 3)


def test_fit_runs_the_async_strategy():
  strategy = async_sgd(linear.loss, optax.sgd(0.01), num_workers=4, pause_prob=0.2, key=0)
  data = [split_workers(linear_regression(), 4)] * 30
  result = jdist.fit(strategy, strategy.init(linear.init()), data, steps=30, tensorboard=False)
  assert int(result.state.step) == 30 and result.history[-1]["loss"] < result.history[0]["loss"]
  assert {"num_delivered", "max_staleness", "mean_staleness"} <= set(result.history[-1])
  assert isinstance(strategy, jdist.Strategy) and strategy.name.startswith("async_sgd[N=4")


def test_example_runs_quickly(tmp_path):
  from tests.test_examples import load_example

  example = load_example("async_sgd")
  results = example.run(ticks=40, out=str(tmp_path), verbose=True, bounds=(4,), lrs=("inverse",), linear_ticks=3000)
  np.testing.assert_allclose(results["linear_regression"]["w"], 2.0, atol=1e-2)
  np.testing.assert_allclose(results["linear_regression"]["b"], 1.0, atol=1e-2)
  assert set(results["digits"]) == {"s=4, lr=inverse"}
  assert all(r["final_loss"] < r["first_loss"] for r in results["digits"].values())
  assert (tmp_path / "async_sgd.png").exists()
