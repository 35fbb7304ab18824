"""Pipeline parallelism equals the same layers run in sequence on one device; the bubble is the textbook one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.pipeline import pipeline, pipeline_schedule, unstack_params
from tests.conftest import assert_trees_all_close

W, D_IN, LAYERS = 8, 5, 8


def stage_fn(layer, x):
  return x + jnp.tanh(x @ layer["w"] + layer["b"])


def input_fn(params, batch):
  return batch["x"] @ params["w_in"]


def loss_fn(params, y, batch):
  return jnp.mean((y @ params["w_out"] - batch["y"]) ** 2)


def sequential_loss(params, batch):
  """The reference: the same layers, one after another, on one device."""
  x = input_fn(params, batch)
  x = jax.lax.scan(lambda h, layer: (stage_fn(layer, h), None), x, params["stages"])[0]
  return loss_fn(params, x, batch)


def make_params(layers=LAYERS, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"stages": {"w": 0.5 * jax.random.normal(k[0], (layers, W, W)) / np.sqrt(W),
                     "b": 0.1 * jax.random.normal(k[1], (layers, W))},
          "w_in": jax.random.normal(k[2], (D_IN, W)) / np.sqrt(D_IN),
          "w_out": jax.random.normal(k[3], (W, 2)) / np.sqrt(W)}


def make_batches(steps, batch, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(batch, D_IN)).astype(np.float32), "y": rng.normal(size=(batch, 2)).astype(np.float32)}
          for _ in range(steps)]


def reference(params, batches, optimizer):
  opt_state = optimizer.init(params)
  step = jax.jit(lambda p, o, b: (lambda l, g: (optax.apply_updates(p, optimizer.update(g, o, p)[0]),
                                                 optimizer.update(g, o, p)[1], l))(*jax.value_and_grad(sequential_loss)(p, b)))
  losses = []
  for b in batches:
    params, opt_state, loss = step(params, opt_state, b)
    losses.append(float(loss))
  return params, losses


CASES = [(p, m, s) for p in (2, 4, 8) for s in ("gpipe", "circular") for m in (1, p, 4 * p)]


@pytest.mark.parametrize("p,m,schedule", CASES, ids=[f"p{p}-m{m}-{s}" for p, m, s in CASES])
def test_pipeline_equals_sequential(p, m, schedule):
  layers = 16 if (schedule == "circular" and p == 8) else LAYERS  # circular needs p x 2 virtual stages
  params = make_params(layers)
  batches = make_batches(20, batch=4 * p * 2)
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-2), mesh, microbatches=m, schedule=schedule, input_fn=input_fn)
  state = strategy.init(params)
  losses = []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  ref, ref_losses = reference(params, batches, optax.adam(1e-2))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_trees_all_close(unstack_params(jax.device_get(state.params)), ref, rtol=1e-5, atol=1e-6)
  sched = strategy.info["schedule"]
  np.testing.assert_allclose(float(metrics["bubble"]), sched.bubble, rtol=1e-6)  # counted while running


def test_data_x_pipe_mesh():
  params = make_params()
  batches = make_batches(20, batch=32)
  mesh = jdist.make_mesh(data=2, pipe=4)
  for schedule in ("gpipe", "circular"):
    strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-2), mesh, microbatches=4, schedule=schedule,
                        data_axis="data", input_fn=input_fn)
    state = strategy.init(params)
    for b in batches:
      state, metrics = strategy.step(state, strategy.shard_batch(b))
    ref, ref_losses = reference(params, batches, optax.adam(1e-2))
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[-1], rtol=1e-5)
    assert_trees_all_close(unstack_params(jax.device_get(state.params)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p,m", [(2, 1), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_bubble_matches_the_formulas(p, m):
  gpipe = pipeline_schedule(p, m, "gpipe")
  assert gpipe.ticks == m + p - 1
  assert gpipe.bubble == pytest.approx((p - 1) / (m + p - 1))
  if m % p == 0:
    for v in (2, 4):
      circ = pipeline_schedule(p, m, "circular", repeats=v)
      assert circ.ticks == m * v + p - 1
      assert circ.bubble == pytest.approx((p - 1) / (m * v + p - 1))
      # every micro-batch visits every virtual stage once, in order, one device after the next
      for i in range(m):
        ts, ds = np.nonzero(circ.table == i)
        order = np.argsort(ts)
        stages = circ.lap[ts[order], ds[order]] * p + ds[order]
        np.testing.assert_array_equal(stages, np.arange(p * v))
        np.testing.assert_array_equal(np.diff(ts[order]), 1)


def test_schedule_table_text():
  text = pipeline_schedule(4, 8, "gpipe").format()
  lines = text.splitlines()
  assert lines[0].split() == ["tick", "dev", "0", "dev", "1", "dev", "2", "dev", "3"]
  assert lines[1].split() == ["0", "0", ".", ".", "."]
  assert lines[4].split() == ["3", "3", "2", "1", "0"]
  assert "bubble: 0.273" in text


# ---- bad input -----------------------------------------------------------------------------------------


def test_batch_not_divisible_into_microbatches():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=4, devices=jax.devices()[:4]),
                      microbatches=8, input_fn=input_fn)
  with pytest.raises(ValueError, match=r"batch size 12 is not divisible by 8.*into 8 micro-batches"):
    strategy.shard_batch(make_batches(1, 12)[0])


def test_layers_not_divisible_by_the_pipe_axis():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=4, devices=jax.devices()[:4]),
                      microbatches=4, schedule="circular", input_fn=input_fn)
  with pytest.raises(ValueError, match=r"6 stacked layers cannot be split into 4 pipeline devices x 2 virtual stages"):
    strategy.init(make_params(layers=6))


def test_stage_params_not_stacked():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=2, devices=jax.devices()[:2]),
                      input_fn=input_fn)
  bad = make_params()
  bad["stages"]["b"] = bad["stages"]["b"][:3]
  with pytest.raises(ValueError, match=r"must be stacked: every leaf with the same leading \(layer\) size"):
    strategy.init(bad)
  with pytest.raises(ValueError, match=r"must be a dict with a 'stages' entry"):
    strategy.init({"layers": make_params()["stages"]})
  with pytest.raises(ValueError, match="Unknown schedule: '1f1b'"):
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=2, devices=jax.devices()[:2]), schedule="1f1b")
