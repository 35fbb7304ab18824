"""Async SGD under SSP: the gate holds reads, never gradients; Ho et al.'s guarantees hold on long random runs; the
update rules match a float64 numpy parameter server tick by tick; the staleness bound in updates holds."""
import jax
import numpy as np
import optax
import pytest

import jdist
from jdist.datasets import linear_regression
from jdist.models import linear
from jdist.strategies.async_sgd import async_sgd, fixed_speeds, split_workers
from tests._async_reference import numpy_server


def _lin_batches(ticks, workers, b, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(ticks, workers, b, 1)).astype(np.float32)
  return {"x": x, "y": (2 * x + 1 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)}


def _article(workers, ticks):
  """The article's 8 points split over the workers, the same batch every tick: [ticks, workers, b, 1]."""
  return jax.tree.map(lambda x: np.broadcast_to(x, (ticks, *x.shape)), split_workers(linear_regression(), workers))


def _ssp_checks(m, alive, s):
  """Ho et al.'s SSP guarantees, from a run's per-tick masks alone (delivered, pulled, waiting, alive).

  Returns the largest clock staleness and clock spreads seen, to show the bound was reached."""
  delivered, pulled, waiting = (np.asarray(m[k]).astype(bool) for k in ("delivered", "pulled", "waiting"))
  ticks, n = delivered.shape
  clocks = np.cumsum(delivered, axis=0)  # after each tick: gradients delivered, the timestamp of the next one
  slowest = np.where(alive, clocks, np.iinfo(np.int64).max).min(1)
  # no finished gradient is held, and the gate holds exactly the workers too far ahead, both ways
  before = np.vstack([np.zeros((1, n), bool), waiting[:-1]])
  assert not (delivered & before).any(), "a waiting worker delivered"
  idle = alive & (delivered | before)
  ahead = clocks - slowest[:, None] > s
  np.testing.assert_array_equal(pulled, idle & ~ahead)
  np.testing.assert_array_equal(waiting, idle & ahead)
  # (3) a gradient of timestamp c read every update of timestamp <= c - s - 1 of every alive worker; (4) and
  # every update of its own worker
  last_pull = np.full(n, -1)  # the tick of each worker's last pull (-1: the initial parameters)
  worst = 0
  for t in range(ticks):
    for w in np.flatnonzero(delivered[t]):
      c = clocks[t, w] - 1
      p = last_pull[w]
      seen = clocks[p] if p >= 0 else np.zeros(n, int)
      read_alive = alive[p] if p >= 0 else alive[0]
      assert (seen[read_alive] >= c - s).all(), (t, w, c, seen)
      assert seen[w] == c, "read-my-writes"
      worst = max(worst, c - (seen[read_alive].min()))
    last_pull[pulled[t]] = t
  # (1) the workers that compute are within s clocks of the slowest; a waiting one may be s + 1 ahead
  computing = alive & ~waiting
  spread_computing = (np.where(computing, clocks, -1).max(1) - slowest).max()
  spread = (np.where(alive, clocks, -1).max(1) - slowest).max()
  assert spread_computing <= s and spread <= s + 1
  return worst, spread_computing, spread


@pytest.mark.parametrize("s,apply", [(0, "mean"), (1, "each"), (3, "mean")])
def test_ssp_guarantees_hold_over_10000_ticks_of_pauses(s, apply):
  n, ticks, fail_at = 4, 10_000, 6_000
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), None, num_workers=n, max_staleness=s, pause_prob=0.5,
                       fail={3: fail_at}, apply=apply)
  state, m = jdist.scan_steps(strategy, strategy.init(linear.init(), key=s), _article(n, ticks))
  m = jax.device_get(m)
  alive = np.ones((ticks, n), bool)
  alive[fail_at:, 3] = False
  np.testing.assert_array_equal(m["num_alive"], alive.sum(1))
  worst, spread_computing, spread = _ssp_checks(m, alive, s)
  assert worst == s and spread_computing == s and spread == s + 1  # the bounds are reached, and held
  assert m["max_clock_staleness"].max() == s and m["clock_spread"].max() == s + 1
  delivered = m["delivered"].astype(bool)
  np.testing.assert_array_equal(m["clock_staleness"] >= 0, delivered)
  # in server updates: another worker delivers at most 2s + 1 gradients while one is in flight
  assert 0 < m["staleness"].max() <= (n - 1) * (2 * s + 1)
  assert (m["staleness"][~delivered] == -1).all()
  np.testing.assert_array_equal(m["updates"], delivered.sum(1) if apply == "each" else delivered.any(1))
  assert m["num_waiting"].sum() > 0 and delivered[-1000:, :3].sum() > 500  # waits happen; the dead do not block
  assert not np.isnan(m["loss"]).any()


def test_without_bound_nobody_waits_and_clocks_drift_apart():
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), None, num_workers=4, pause_prob=0.5)
  _, m = jdist.scan_steps(strategy, strategy.init(linear.init()), _article(4, 2000))
  assert np.asarray(m["clock_spread"]).max() > 3 and np.asarray(m["num_waiting"]).max() == 0
  np.testing.assert_array_equal(m["pulled"], m["delivered"])  # everyone who delivers reads at once


def test_the_staleness_bound_in_updates_is_reached_by_two_workers():
  """N = 2, s = 1: worker 0 delivers its gradient of clock 0 and pulls while worker 1 is still at clock 0; worker 1
  then delivers clocks 0, 1 and 2 (2s + 1 gradients, each an update) before worker 0's gradient of clock 1 lands."""
  schedule = lambda key, tick, n: jax.numpy.array([tick % 4 == 0, tick % 4 != 0])
  strategy = async_sgd(linear.loss, optax.sgd(1e-3), None, num_workers=2, max_staleness=1, apply="each",
                       delay=schedule)
  _, m = jdist.scan_steps(strategy, strategy.init(linear.init()), _article(2, 8))
  np.testing.assert_array_equal(np.asarray(m["staleness"])[:5], [[0, -1], [-1, 1], [-1, 0], [-1, 0], [3, -1]])
  np.testing.assert_array_equal(np.asarray(m["waiting"])[3], [0, 1])  # worker 1 at clock 3 waits for clock 1


# The update rules against the numpy server: fixed speeds (the server simulates the schedule itself) and random
# pauses (the server replays jdist's deliveries and checks that no waiting worker delivered)
CASES = [
    ("fixed", None, "each", True, 0.0), ("fixed", 1, "each", False, 0.5), ("fixed", 1, "mean", True, 0.5),
    ("fixed", 0, "mean", False, 0.0), ("pauses", 2, "each", True, 0.5), ("pauses", 0, "mean", True, 0.5),
    ("pauses", None, "mean", False, 0.0),
]


@pytest.mark.parametrize("schedule,s,apply,inverse,lam", CASES)
def test_every_tick_matches_a_float64_numpy_parameter_server(schedule, s, apply, inverse, lam):
  n, ticks, lr = 3, 40, 0.05
  batches = _lin_batches(ticks, n, 4)
  kw = {"delay": fixed_speeds([1, 2, 3])} if schedule == "fixed" else {"pause_prob": 0.4}
  strategy = async_sgd(linear.loss, optax.sgd(lr, momentum=0.9), None, num_workers=n, max_staleness=s, apply=apply,
                       staleness_lr="inverse" if inverse else None, delay_compensation=lam, **kw)
  state = strategy.init(linear.init(), key=3)
  params, ms = [], []
  for t in range(ticks):
    state, m = strategy.step(state, strategy.shard_batch(jax.tree.map(lambda x: x[t], batches)))
    params.append([float(state.params["w"][0, 0]), float(state.params["b"][0])])
    ms.append(jax.device_get(m))
  m = {k: np.stack([x[k] for x in ms]) for k in ("delivered", "pulled", "waiting", "staleness", "loss")}
  given = {"periods": [1, 2, 3]} if schedule == "fixed" else {"delivered": m["delivered"].astype(bool)}
  ref = numpy_server(batches, lr=lr, momentum=0.9, apply=apply, s=s, lam=lam, inverse=inverse, **given)
  for k in ("delivered", "pulled", "waiting", "staleness"):
    np.testing.assert_array_equal(m[k].astype(ref[k].dtype), ref[k], err_msg=k)
  np.testing.assert_allclose(np.array(params), ref["params"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-4)  # a waiting worker's stale copy does not count
  assert m["staleness"].max() >= 2 and 0 < m["delivered"].mean() < 1  # stale gradients, and not every tick
  if s is not None and schedule == "fixed":
    assert m["waiting"].any()  # the slow worker holds the fast ones back
