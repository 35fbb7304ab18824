"""The pieces of an async SGD tick, each alone: delay models, the schedule, the SSP gate, the two update rules, the
pull and the server's layout (module-level functions of an AsyncConfig; no strategy is built)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.errors import OptionError
from jdist.strategies.async_sgd import AsyncConfig, every_tick, fixed_speeds, geometric, pauses, uniform
from jdist.strategies.async_sgd._config import NEVER
from jdist.strategies.async_sgd._delays import as_delay_model
from jdist.strategies.async_sgd._gate import deliveries, gate
from jdist.strategies.async_sgd._pull import pull
from jdist.strategies.async_sgd._server import apply_each, apply_mean, server_specs

KEY = jax.random.key(0)
B = lambda *x: jnp.array(x, bool)  # noqa: E731
I = lambda *x: jnp.array(x, jnp.int32)  # noqa: E731


def _run(model, computing, ticks):
  """The masks a delay model gives over ``ticks`` ticks with the given computing mask (bool[ticks, n])."""

  def tick(state, t):
    done, state = model.finish(state, jax.random.fold_in(KEY, t), t, computing[t])
    return state, jnp.asarray(done).astype(bool)

  computing = jnp.asarray(computing)
  return np.asarray(jax.lax.scan(tick, model.init(KEY, computing.shape[1]), jnp.arange(ticks, dtype=jnp.int32))[1])


def test_delay_models_count_only_the_ticks_a_worker_computes():
  always = np.ones((6, 3), bool)
  np.testing.assert_array_equal(_run(fixed_speeds([1, 2, 3]), always, 6),
                                [[(t + 1) % p == 0 for p in (1, 2, 3)] for t in range(6)])
  # worker 1 (period 2) waits at ticks 1 and 2: its gradient needs two computing ticks, 0 and 3
  computing = always.copy()
  computing[1:3, 1] = False
  np.testing.assert_array_equal(_run(fixed_speeds([1, 2, 3]), computing, 6)[:, 1], [0, 0, 0, 1, 0, 1])
  # uniform(2, 2): every second computing tick; a pause stops its countdown
  computing = np.array([[1], [0], [0], [1], [1], [1]], bool)
  np.testing.assert_array_equal(_run(uniform(2, 2), computing, 6)[:, 0], [0, 0, 0, 1, 0, 1])
  assert not _run(every_tick(), np.zeros((3, 2), bool), 3).any()  # nothing finishes that does not compute
  assert not _run(geometric(1.0), np.zeros((3, 2), bool), 3).any()


def test_uniform_and_geometric_draw_the_stated_compute_times():
  gaps = np.diff(np.flatnonzero(_run(uniform(2, 4), np.ones((1500, 2), bool), 1500)[:, 0]))
  assert set(gaps) == {2, 3, 4} and abs(gaps.mean() - 3) < 0.2
  assert abs(_run(geometric(0.25), np.ones((1500, 2), bool), 1500).mean() - 0.25) < 0.04


def test_pauses_are_a_delay_model():
  done = _run(pauses(0.25), np.ones((4000, 2), bool), 4000)
  assert abs(done.mean() - 0.75) < 0.03
  # around a model with a clock: a paused tick does not count towards fixed_speeds' period
  slow = _run(pauses(0.5, fixed_speeds([2])), np.ones((4000, 1), bool), 4000)
  assert abs(slow.mean() - 0.25) < 0.03
  with pytest.raises(OptionError) as e:
    pauses(1.0)
  assert e.value.name == "pause_prob"
  fn = as_delay_model(lambda key, tick, n: jnp.ones((n,), bool))  # a plain function: a stateless model
  assert fn.init(KEY, 3) == () and fn.finish((), KEY, 0, B(1, 0, 1))[0].shape == (3,)


def test_deliveries_drop_the_dead_and_the_waiting():
  cfg = AsyncConfig(num_workers=4, fail=(NEVER, 2, NEVER, NEVER))
  sched = deliveries(cfg, B(1, 1, 1, 1), B(0, 0, 1, 0), (), KEY, jnp.int32(2))
  np.testing.assert_array_equal(sched.alive, [1, 0, 1, 1])
  np.testing.assert_array_equal(sched.computing, [1, 0, 0, 1])
  np.testing.assert_array_equal(sched.deliver, [1, 0, 0, 1])  # every_tick: all computing workers finish
  # a plain function may say that any worker finishes: only those that compute deliver
  anyone = AsyncConfig(num_workers=4, fail=(NEVER, 2, NEVER, NEVER),
                       delay=as_delay_model(lambda key, tick, n: jnp.ones((n,), bool)))
  np.testing.assert_array_equal(deliveries(anyone, B(1, 1, 1, 1), B(0, 0, 1, 0), (), KEY, jnp.int32(2)).deliver,
                                [1, 0, 0, 1])


def test_the_gate_lets_read_only_workers_within_s_of_the_slowest_alive():
  clock, alive = I(5, 3, 4, 1), B(1, 1, 1, 0)  # worker 3 is dead: the slowest alive clock is 3
  idle = B(1, 0, 1, 0)
  for s, pull_mask in ((0, [0, 0, 0, 0]), (1, [0, 0, 1, 0]), (2, [1, 0, 1, 0]), (None, [1, 0, 1, 0])):
    pulls, waiting = gate(clock, alive, idle, s)
    np.testing.assert_array_equal(pulls, pull_mask, err_msg=str(s))
    np.testing.assert_array_equal(waiting, np.asarray(idle) & ~np.asarray(pull_mask, bool), err_msg=str(s))
  pulls, _ = gate(I(0, 0), B(1, 1), B(1, 1), 0)  # the slowest always passes: no deadlock at s = 0
  assert pulls.all()


def _server(n=3):
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)}
  copies = {"w": jnp.zeros((n, 2))}
  return params, grads, copies


@pytest.mark.parametrize("inverse", [False, True])
def test_apply_mean_is_one_update_of_the_mean_scaled_by_the_mean_staleness(inverse):
  cfg = AsyncConfig(num_workers=3, staleness_lr="inverse" if inverse else None)
  params, grads, copies = _server()
  opt = optax.sgd(0.1)
  deliver, pulled = B(1, 0, 1), I(4, 0, 1)
  (new, _, version), tau = apply_mean(cfg, opt, (params, opt.init(params), jnp.int32(5)), grads, copies,
                                      jnp.zeros(3), deliver, pulled)
  np.testing.assert_array_equal(tau, [1, -1, 4])
  scale = 1 / 2.5 if inverse else 1.0  # the mean staleness of the two gradients
  np.testing.assert_allclose(new["w"], np.array([1.0, -2.0]) - 0.1 * scale * np.array([2.0, 3.0]), rtol=1e-6)
  assert int(version) == 6
  (same, _, version), tau = apply_mean(cfg, opt, (params, opt.init(params), jnp.int32(5)), grads, copies,
                                       jnp.zeros(3), B(0, 0, 0), pulled)
  np.testing.assert_array_equal(same["w"], params["w"])  # nothing delivered: no update
  assert int(version) == 5 and (np.asarray(tau) == -1).all()


def test_apply_each_is_one_update_per_gradient_in_worker_order_with_dc_asgd():
  lam = 0.5
  cfg = AsyncConfig(num_workers=3, staleness_lr="inverse", delay_compensation=lam)
  params, grads, copies = _server()
  opt = optax.sgd(0.1)
  (new, _, version), tau = apply_each(cfg, opt, (params, opt.init(params), jnp.int32(2)), grads, copies,
                                      jnp.zeros(3), B(0, 1, 1), I(0, 2, 0))
  p = np.array([1.0, -2.0])
  for w, t in ((1, 0), (2, 3)):  # worker 2's staleness counts worker 1's update of the same tick
    g = np.asarray(grads["w"][w])
    g = g + lam * g * g * (p - 0.0)
    p = p - 0.1 * g / max(1, t)
  np.testing.assert_allclose(new["w"], p, rtol=1e-6)
  np.testing.assert_array_equal(tau, [-1, 0, 3])
  assert int(version) == 4


def test_pull_copies_the_server_into_the_masked_workers_only():
  mesh = jdist.make_mesh(workers=2, devices=jax.devices()[:2])
  cfg = AsyncConfig(num_workers=4, devices=2)
  params = {"w": jnp.arange(4096.0).reshape(2, 2048)}  # big enough to be split over the 2 devices
  specs = server_specs(cfg, params)
  assert specs["w"] == jax.sharding.PartitionSpec("workers")
  copies = {"w": jnp.zeros((4, 2, 2048))}
  out = jax.jit(pull(cfg, mesh, specs))(params, copies, B(0, 1, 1, 0))
  for w, pulled in enumerate((False, True, True, False)):
    np.testing.assert_array_equal(out["w"][w], params["w"] if pulled else 0)


def test_server_specs_split_big_leaves_on_their_first_divisible_dimension():
  cfg = AsyncConfig(num_workers=4, devices=4)
  P = jax.sharding.PartitionSpec
  specs = server_specs(cfg, {"a": jnp.zeros((6, 256)), "b": jnp.zeros((256, 3)), "c": jnp.zeros((3, 5, 512))})
  assert specs == {"a": P(None, "workers"), "b": P(), "c": P(None, None, "workers")}
  assert server_specs(AsyncConfig(num_workers=4), {"a": jnp.zeros((8, 1024))}) == {"a": P()}  # one device


def test_config_checks_its_values():
  for kw, name in (({"num_workers": 6, "devices": 4}, "num_workers"), ({"max_staleness": 1.5}, "max_staleness"),
                   ({"apply": "sum"}, "apply"), ({"fail": (1, 2)}, "fail")):
    with pytest.raises(OptionError) as e:
      AsyncConfig(**{"num_workers": 4, **kw})
    assert e.value.name == name
  cfg = AsyncConfig(num_workers=np.int64(4), max_staleness=np.int32(2))
  assert type(cfg.num_workers) is int and type(cfg.max_staleness) is int and cfg.fail == (NEVER,) * 4
