"""jdist.fit: callbacks, checkpoints that resume exactly, corrupted checkpoints, NaN guard, resharding."""
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.data import ArrayLoader
from jdist.models import mlp
from jdist.train import (
  Callback,
  CheckpointConfig,
  CheckpointError,
  NanGuard,
  PrintLogger,
  fit,
  read_jsonl,
)
from tests.conftest import assert_trees_all_close


def _data(n=256, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n).astype(np.int32)}


def _setup(n_devices=8, seed=0, lr=1e-2, init_seed=None):
  mesh = jdist.make_mesh(data=n_devices, devices=jax.devices()[:n_devices])
  strategy = jdist.data_parallel(mlp.loss, optax.adam(lr), mesh)
  state = strategy.init(mlp.init(jax.random.key(seed if init_seed is None else init_seed), [6, 16, 3]))
  loader = ArrayLoader(_data(), batch_size=32, seed=seed)  # 8 batches per epoch: resumes cross epochs
  return strategy, state, loader


def _eval_fn(params, batch):
  return {"loss": mlp.loss(params, batch), "accuracy": mlp.accuracy(params, batch)}


class Recorder(Callback):
  def __init__(self):
    self.events = []

  def on_start(self, loop, step):
    self.events.append(("start", step))

  def on_step(self, loop, step, metrics):
    self.events.append(("step", step))

  def on_eval(self, loop, step, metrics):
    self.events.append(("eval", step))

  def on_checkpoint(self, loop, step, path):
    self.events.append(("checkpoint", step))

  def on_end(self, loop, result):
    self.events.append(("end", int(result.state.step)))


def test_callbacks_fire_at_the_right_steps(tmp_path):
  strategy, state, loader = _setup()
  rec = Recorder()
  result = fit(strategy, state, loader, steps=12, callbacks=[rec], eval_fn=_eval_fn, eval_data=_data(40, 1),
               eval_every=5, checkpoint=CheckpointConfig(directory=tmp_path / "ckpt", every_steps=4),
               run_dir=tmp_path, log_every=3)
  ev = rec.events
  assert ev[0] == ("start", 0) and ev[-1] == ("end", 12)
  assert [s for k, s in ev if k == "step"] == list(range(1, 13))
  assert [s for k, s in ev if k == "eval"] == [5, 10, 12]
  assert [s for k, s in ev if k == "checkpoint"] == [4, 8, 12]
  # order within a step: step, then eval, then checkpoint
  assert ev.index(("step", 10)) < ev.index(("eval", 10)) < ev.index(("step", 11))
  logged = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in logged if "loss" in r] == [3, 6, 9, 12]
  assert [r["step"] for r in logged if "eval_accuracy" in r] == [5, 10, 12]
  assert [r["step"] for r in read_jsonl(tmp_path / "timing.jsonl")] == [3, 6, 9, 12]
  assert all(r["steps_per_s"] > 0 for r in read_jsonl(tmp_path / "timing.jsonl"))
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(result.history) == 12 and result.stop_reason is None
  # a callback failing in on_start still ends the others (a progress bar stops) and the writers close
  class Broken(Callback):
    def on_start(self, loop, step):
      raise RuntimeError("broken on_start")

  rec = Recorder()
  with pytest.raises(RuntimeError, match="broken on_start"):
    fit(strategy, result.state, loader, steps=14, callbacks=[rec, Broken()], run_dir=tmp_path)
  assert rec.events[0] == ("start", 12) and rec.events[-1][0] == "end"


def test_history_matches_plain_optax():
  strategy, state, loader = _setup()
  result = fit(strategy, state, loader, steps=10)
  ref_loader = ArrayLoader(_data(), batch_size=32, seed=0)
  batches = [b for b, _ in zip(ref_loader, range(10))]
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  from tests.conftest import single_device_reference
  ref_params, _, ref_losses = single_device_reference(mlp.loss, optax.adam(1e-2), params, batches)
  np.testing.assert_allclose([h["loss"] for h in result.history], ref_losses, rtol=1e-5)
  assert_trees_all_close(result.state.params, ref_params)


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
  strategy, state, loader = _setup()
  full = fit(strategy, state, loader, steps=20, run_dir=tmp_path / "full", log_every=1,
             checkpoint=CheckpointConfig(directory=tmp_path / "full" / "ckpt", every_steps=5))
  ck = CheckpointConfig(directory=tmp_path / "cut" / "ckpt", every_steps=5, save_at_end=False)
  strategy, state, loader = _setup()
  fit(strategy, state, loader, steps=13, run_dir=tmp_path / "cut", log_every=1, checkpoint=ck)  # last ckpt: 10
  strategy, state, loader = _setup()  # a fresh process would build the same
  resumed = fit(strategy, state, loader, steps=20, run_dir=tmp_path / "cut", log_every=1, checkpoint=ck)
  assert resumed.start_step == 10
  _leaves_equal(resumed.state.params, full.state.params)
  _leaves_equal(resumed.state.opt_state, full.state.opt_state)
  assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == (tmp_path / "full" / "metrics.jsonl").read_bytes()


def _data_files(step_dir: pathlib.Path):
  # orbax (OCDBT) reads the finalised arrays from state/d/; the per-process copies are not read back
  return [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]


def _truncate(step_dir: pathlib.Path):
  for victim in _data_files(step_dir):
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _flip_bytes(step_dir: pathlib.Path):
  for victim in _data_files(step_dir):
    data = bytearray(victim.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
    victim.write_bytes(bytes(data))


def _flip_headers(step_dir: pathlib.Path):
  for victim in _data_files(step_dir):
    data = bytearray(victim.read_bytes())
    data[:16] = bytes(255 - b for b in data[:16])
    victim.write_bytes(bytes(data))


def _swap_state_from_another_run(step_dir: pathlib.Path):
  """A well-formed checkpoint whose arrays are not the ones saved: only the checksums can tell."""
  import shutil
  other = step_dir.parent.parent / "other"
  strategy, state, loader = _setup(seed=7)
  fit(strategy, state, loader, steps=10, checkpoint=CheckpointConfig(directory=other, every_steps=10))
  shutil.rmtree(step_dir / "state")
  shutil.copytree(other / "10" / "state", step_dir / "state")


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _flip_headers, _swap_state_from_another_run])
def test_corrupted_latest_checkpoint_is_reported_and_fallback_only_when_allowed(tmp_path, damage, monkeypatch):
  # a failed read leaves orbax's other reads in flight; they must not print a traceback each
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
  ckdir = tmp_path / "run" / "ckpt"
  strategy, state, loader = _setup()
  fit(strategy, state, loader, steps=10, checkpoint=CheckpointConfig(directory=ckdir, every_steps=5))
  damage(ckdir / "10")
  strategy, state, loader = _setup()
  with pytest.raises(CheckpointError, match=r"ckpt/10 cannot be read .*Nothing was overwritten.*fallback=True") as err:
    fit(strategy, state, loader, steps=15, checkpoint=CheckpointConfig(directory=ckdir, every_steps=5))
  if damage is _swap_state_from_another_run:
    assert "do not match the checksums" in str(err.value)
  assert "[tens" not in str(err.value) and "TensorStore details" not in str(err.value)
  assert sorted(p.name for p in ckdir.iterdir()) == ["10", "5"]  # untouched
  strategy, state, loader = _setup()
  resumed = fit(strategy, state, loader, steps=15,
                checkpoint=CheckpointConfig(directory=ckdir, every_steps=5, fallback=True))
  assert resumed.start_step == 5
  assert [p.name.split("-")[0] for p in (ckdir / "unreadable").iterdir()] == ["10"]  # kept, moved aside
  strategy, state, loader = _setup()
  reference = fit(strategy, state, loader, steps=15)
  _leaves_equal(resumed.state.params, reference.state.params)
  time.sleep(0.2)
  assert unraisable == []


@pytest.mark.parametrize("change", ["model", "optimizer", "dtype"])
def test_a_checkpoint_of_another_configuration_is_named_never_moved_aside(tmp_path, change):
  # a readable checkpoint written for another model, optimizer or precision is a configuration error, not
  # damage: even with fallback=True it stays where it is, and the right configuration then resumes from it
  ckdir = tmp_path / "ckpt"
  strategy, state, loader = _setup()
  fit(strategy, state, loader, steps=10, checkpoint=CheckpointConfig(directory=ckdir, every_steps=5))
  mesh = jdist.make_mesh(data=8)
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  other = {"model": lambda: jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh).init(
               mlp.init(jax.random.key(0), [6, 32, 3])),
           "optimizer": lambda: jdist.data_parallel(mlp.loss, optax.sgd(1e-2), mesh).init(params),
           "dtype": lambda: jdist.data_parallel(mlp.loss, optax.adam(1e-2), mesh).init(
               jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))}[change]()
  expected = {"model": r"params/layers/0/b is float32\[16\] there and float32\[32\] here",
              "optimizer": r"it has opt_state/0/count, opt_state/0/mu/layers/0/b, opt_state/0/mu/layers/0/w \.\.\. "
                           r"that this run does not",
              "dtype": r"params/layers/0/b is float32\[16\] there and bfloat16\[16\] here"}[change]
  with pytest.raises(CheckpointError, match=r"ckpt/10 was written for a different model, optimizer or number of "
                                            r"devices \(or by a jdist version .*\): " + expected
                                            + r"\. Nothing was moved or overwritten"):
    fit(strategy, other, loader, steps=15, checkpoint=CheckpointConfig(directory=ckdir, every_steps=5, fallback=True))
  assert sorted(p.name for p in ckdir.iterdir()) == ["10", "5"]
  strategy, state, loader = _setup()
  assert fit(strategy, state, loader, steps=15, checkpoint=CheckpointConfig(directory=ckdir)).start_step == 10


def test_saved_on_8_devices_restored_on_4(tmp_path):
  ck = CheckpointConfig(directory=tmp_path / "ckpt", every_steps=5)
  strategy, state, loader = _setup(8)
  on8 = fit(strategy, state, loader, steps=10, checkpoint=ck)
  strategy4, state4, loader4 = _setup(4, init_seed=1)  # different init: everything must come from the checkpoint
  restored = fit(strategy4, state4, loader4, steps=10, checkpoint=ck)
  assert restored.start_step == 10 and not restored.history
  _leaves_equal(restored.state.params, on8.state.params)
  leaf = jax.tree.leaves(restored.state.params)[0]
  assert len(leaf.sharding.device_set) == 4
  cont4 = fit(strategy4, restored.state, loader4, steps=20, checkpoint=ck)
  strategy, state, loader = _setup(8)
  cont8 = fit(strategy, state, loader, steps=20)
  assert_trees_all_close(cont4.state.params, cont8.state.params, rtol=1e-5)


@pytest.mark.parametrize("overlap", [True, False])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, overlap):
  strategy, state, _ = _setup()
  batches = [dict(b) for b, _ in zip(ArrayLoader(_data(), 32, seed=0), range(12))]
  batches[6] = {"x": np.full_like(batches[6]["x"], np.nan), "y": batches[6]["y"]}  # step 7 goes NaN
  ckdir = tmp_path / "ckpt"
  result = fit(strategy, state, batches, steps=12, callbacks=[NanGuard()], overlap=overlap,
               checkpoint=CheckpointConfig(directory=ckdir, every_steps=5), run_dir=tmp_path)
  assert result.failed and "loss is nan at step 7" in result.stop_reason
  assert "last good checkpoint (step 5)" in result.stop_reason
  # with overlap step 8 was already running when step 7's loss was read; it is read too, then the run ends
  last = 8 if overlap else 7
  assert len(result.history) == last and int(result.state.step) == last
  assert np.isnan(result.history[-1]["loss"])
  assert sorted(p.name for p in ckdir.iterdir() if p.name.isdigit()) == ["5"]
  strategy, state, _ = _setup()
  good = fit(strategy, state, batches[:5], steps=5)
  strategy, state, _ = _setup()
  back = fit(strategy, state, batches, steps=5, checkpoint=CheckpointConfig(directory=ckdir))
  _leaves_equal(back.state.params, good.state.params)


def test_plain_iterable_resumes_by_skipping(tmp_path):
  strategy, state, _ = _setup()
  batches = [b for b, _ in zip(ArrayLoader(_data(), 32, seed=3), range(10))]
  full = fit(strategy, state, batches, steps=10)
  strategy, state, _ = _setup()
  ck = CheckpointConfig(directory=tmp_path / "ckpt", every_steps=4, save_at_end=False)
  fit(strategy, state, batches, steps=6, checkpoint=ck)
  strategy, state, _ = _setup()
  resumed = fit(strategy, state, batches, steps=10, checkpoint=ck)
  assert resumed.start_step == 4
  _leaves_equal(resumed.state.params, full.state.params)
  # resumed with the loader the list came from: the newest checkpoint (step 8, written by the run above)
  # holds no data position, so the loader (at its start) skips the 8 batches it covers, as a plain iterable
  # does, instead of replaying them
  strategy, state, _ = _setup()
  resumed = fit(strategy, state, ArrayLoader(_data(), 32, seed=3), steps=10, checkpoint=ck)
  assert resumed.start_step == 8
  _leaves_equal(resumed.state.params, full.state.params)


def test_early_stopping_and_data_exhaustion():
  for overlap, last in ((False, 2), (True, 3)):
    strategy, state, loader = _setup()
    stopper = jdist.train.EarlyStopping("loss", patience=1, min_delta=10.0)  # never improves by 10
    result = fit(strategy, state, loader, steps=50, callbacks=[stopper], overlap=overlap)
    assert result.stop_reason.startswith("early stopping at step 2") and not result.failed
    assert int(result.state.step) == last and len(result.history) == last
  strategy, state, loader = _setup()
  batches = [b for b, _ in zip(loader, range(3))]
  result = fit(strategy, state, batches, steps=10)
  assert result.stop_reason == "the data ran out after step 3"


def test_bad_fit_arguments(tmp_path):
  strategy, state, loader = _setup()
  with pytest.raises(ValueError, match="steps must be a non-negative int"):
    fit(strategy, state, loader, steps=-1)
  with pytest.raises(ValueError, match="eval_fn and eval_data together"):
    fit(strategy, state, loader, steps=1, eval_fn=_eval_fn)
  with pytest.raises(ValueError, match="every_steps must be a positive int"):
    CheckpointConfig(directory=tmp_path, every_steps=0)
  with pytest.raises(ValueError, match="PrintLogger every must be a positive int .*got 0"):
    PrintLogger(every=0)
  with pytest.raises(TypeError, match="NanGuard keys must be metric names"):
    NanGuard(keys=[1])
  assert NanGuard(keys="loss").keys == ("loss",)  # one name, not its letters
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError, match="Cannot create checkpoint directory"):
    fit(strategy, state, loader, steps=1, checkpoint=CheckpointConfig(directory=blocker / "ckpt"))


def test_loader_resumes_mid_epoch():
  a = ArrayLoader(_data(), batch_size=32, seed=5)
  it = iter(a)
  first = [next(it) for _ in range(11)]  # one epoch (8) and 3 more
  b = ArrayLoader(_data(), batch_size=32, seed=5)
  b.set_state(json.loads(json.dumps(a.get_state())))
  nxt = next(iter(b))
  c = ArrayLoader(_data(), batch_size=32, seed=5)
  expected = [x for x, _ in zip(c, range(12))][-1]
  np.testing.assert_array_equal(nxt["x"], expected["x"])
  assert not np.array_equal(first[0]["x"], first[8]["x"])  # a new permutation each epoch
  # set_state moves an iterator already running too (a hand-written resume keeps its iterator)
  a.set_state({"epoch": 0, "index": 2})
  np.testing.assert_array_equal(next(it)["x"], first[2]["x"])
  a.set_state({"epoch": 1, "index": 0})
  np.testing.assert_array_equal(next(it)["x"], first[8]["x"])
  with pytest.raises(TypeError, match="ArrayLoader takes a dict of arrays"):
    ArrayLoader((_data()["x"], _data()["y"]), batch_size=32)
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
    ArrayLoader(_data(), batch_size=32, seed=-1)


class _CountingStep:
  """A strategy step that counts how many steps have been dispatched."""

  def __init__(self, step):
    self.step, self.dispatched = step, 0

  def __call__(self, state, batch):
    self.dispatched += 1
    return self.step(state, batch)


class _SeesDispatched(Callback):
  def __init__(self, counter):
    self.counter, self.seen = counter, {}

  def on_step(self, loop, step, metrics):
    self.seen[step] = self.counter.dispatched


def _overlap_run(tmp_path, overlap):
  # one device: its dispatch is asynchronous, as on a GPU (multi-device CPU steps block, see StepFn)
  strategy, state, loader = _setup(n_devices=1)
  counter = _CountingStep(strategy.step)
  strategy = strategy._replace(step=counter)
  seer = _SeesDispatched(counter)
  run_dir = tmp_path / f"overlap_{overlap}"
  result = fit(strategy, state, loader, steps=13, callbacks=[seer], overlap=overlap, eval_fn=_eval_fn,
               eval_data=_data(40, 1), eval_every=5, log_every=2, run_dir=run_dir, tensorboard=False,
               checkpoint=CheckpointConfig(directory=run_dir / "ckpt", every_steps=4, keep=10))
  return result, seer.seen, run_dir


def test_overlap_reads_each_step_while_the_next_runs_and_changes_nothing(tmp_path):
  fast, seen_fast, dir_fast = _overlap_run(tmp_path, True)
  slow, seen_slow, dir_slow = _overlap_run(tmp_path, False)
  assert seen_slow == {k: k for k in range(1, 14)}
  # steps with an evaluation (5, 10, 13) or a checkpoint (4, 8, 12) are read before the next step starts
  sync = {4, 5, 8, 10, 12, 13}
  assert seen_fast == {k: k if k in sync else k + 1 for k in range(1, 14)}
  _leaves_equal(fast.state.params, slow.state.params)
  _leaves_equal(fast.state.opt_state, slow.state.opt_state)
  assert fast.history == slow.history and fast.eval_history == slow.eval_history
  assert (dir_fast / "metrics.jsonl").read_text() == (dir_slow / "metrics.jsonl").read_text()
  ck = lambda d: sorted(int(p.name) for p in (d / "ckpt").iterdir() if p.name.isdigit())
  assert ck(dir_fast) == ck(dir_slow) == [4, 8, 12, 13]
  timing = read_jsonl(dir_fast / "timing.jsonl")
  assert [r["step"] for r in timing] == [2, 4, 6, 8, 10, 12, 13]


def test_metrics_reach_the_host_as_python_numbers_with_or_without_copies_ahead():
  from jdist.train._loop import _host
  metrics = {"loss": jnp.float32(0.25), "half": jnp.bfloat16(1.5), "step": jnp.int32(7), "plain": 2.0,
             "vector": jnp.ones(3)}  # not a scalar: kept out of the logs
  for copy_ahead in (True, False):  # True on GPU/TPU: every copy started before the first is awaited
    host = _host(metrics, copy_ahead)
    assert host == {"loss": 0.25, "half": 1.5, "step": 7, "plain": 2.0}
    assert list(host) == ["half", "loss", "plain", "step"]  # the logs' key order
    assert [type(v) for v in host.values()] == [float, float, float, int]


def test_progress_bar_shows_the_strategy_name_with_its_brackets(capsys):
  from jdist.train import ProgressBar
  strategy, state, loader = _setup(n_devices=1)
  fit(strategy, state, loader, steps=3, callbacks=[ProgressBar("data_parallel[pmap]")])
  out = capsys.readouterr().out
  assert "data_parallel[pmap]" in out and "3/3" in out  # rich would read [pmap] as markup and drop it


def test_model_flops_and_mfu_in_the_timing_log(tmp_path):
  strategy, state, loader = _setup(n_devices=4)
  flops = 6 * (6 * 16 + 16 * 3) * 32  # 6 x weights x examples per step
  fit(strategy, state, loader, steps=6, log_every=3, run_dir=tmp_path, tensorboard=False,
      flops_per_step=flops, peak_flops=1e9)
  timing = read_jsonl(tmp_path / "timing.jsonl")
  assert [r["step"] for r in timing] == [3, 6]
  for r in timing:
    assert r["model_tflops_per_s"] == pytest.approx(flops * r["steps_per_s"] / 1e12, rel=1e-12)
    assert r["mfu"] == pytest.approx(flops * r["steps_per_s"] / (1e9 * 4), rel=1e-12)  # 4 devices' peak
  fit(strategy, strategy.init(mlp.init(jax.random.key(0), [6, 16, 3])), loader, steps=3, log_every=3,
      run_dir=tmp_path / "cpu", tensorboard=False, flops_per_step=flops)
  (r,) = read_jsonl(tmp_path / "cpu" / "timing.jsonl")  # the CPU's peak is unknown: no MFU, FLOP/s still
  assert "mfu" not in r and r["model_tflops_per_s"] > 0
  fit(strategy, strategy.init(mlp.init(jax.random.key(0), [6, 16, 3])), loader, steps=3, log_every=3,
      run_dir=tmp_path / "np", tensorboard=False, flops_per_step=np.int64(flops), peak_flops=np.float32(1e9))
  (r,) = read_jsonl(tmp_path / "np" / "timing.jsonl")  # numpy numbers (e.g. from np.prod) are numbers too
  assert r["mfu"] == pytest.approx(flops * r["steps_per_s"] / 4e9, rel=1e-6)
  for bad in (0, -1.0, "6N", True):
    with pytest.raises(ValueError, match="flops_per_step must be a positive number"):
      fit(strategy, state, loader, steps=1, flops_per_step=bad)
  with pytest.raises(ValueError, match="peak_flops must be a positive number"):
    fit(strategy, state, loader, steps=1, flops_per_step=1.0, peak_flops=0)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_step_keeps_the_record_of_the_steps_before(tmp_path, overlap):
  strategy, state, _ = _setup(n_devices=1)
  batches = [b for b, _ in zip(ArrayLoader(_data(), 32, seed=0), range(6))]
  batches[4] = {"x": batches[4]["x"][:, :5], "y": batches[4]["y"]}  # step 5's batch has the wrong shape
  rec = Recorder()
  with pytest.raises(TypeError):
    fit(strategy, state, batches, steps=6, callbacks=[rec], overlap=overlap, log_every=1, run_dir=tmp_path,
        tensorboard=False)
  assert [s for k, s in rec.events if k == "step"] == [1, 2, 3, 4]
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_loader_refuses_a_position_of_another_sequence():
  saved = ArrayLoader(_data(), batch_size=32, seed=5)
  it = iter(saved)
  [next(it) for _ in range(3)]
  state = json.loads(json.dumps(saved.get_state()))
  ArrayLoader(_data(), batch_size=32, seed=5).set_state(state)  # the same settings resume
  for other, what in ((ArrayLoader(_data(), batch_size=16, seed=5), "batch_size=32, but this loader has batch_size=16"),
                      (ArrayLoader(_data(200), batch_size=32, seed=5), "num_examples=256, but this loader has num_ex"),
                      (ArrayLoader(_data(), batch_size=32, seed=5, shuffle=False), "shuffle=1, but this loader"),
                      (ArrayLoader(_data(), batch_size=32, seed=6), "seed=5, but this loader has seed=6")):
    with pytest.raises(ValueError, match="would skip or repeat examples") as err:
      other.set_state(state)
    assert what in str(err.value)


def test_continuing_a_run_with_the_same_iterator_skips_nothing():
  batches = [b for b, _ in zip(ArrayLoader(_data(), 32, seed=3), range(6))]
  strategy, state, _ = _setup()
  straight = fit(strategy, state, batches, steps=6)
  strategy, state, _ = _setup()
  it = iter(batches)
  first = fit(strategy, state, it, steps=3)
  second = fit(strategy, first.state, it, steps=6)  # no checkpoint: the state passed in goes on
  assert second.stop_reason is None and int(second.state.step) == 6
  _leaves_equal(second.state.params, straight.state.params)


def test_parameters_that_overflow_are_never_checkpointed(tmp_path):
  from jdist.models import linear

  mesh = jdist.make_mesh(data=2, devices=jax.devices()[:2])
  strategy = jdist.data_parallel(linear.loss, optax.sgd(1e38), mesh)
  x = np.arange(64, dtype=np.float32).reshape(-1, 1) / 64
  loader = ArrayLoader({"x": x, "y": 2 * x + 1}, batch_size=8, seed=0)
  ckdir = tmp_path / "ckpt"
  result = fit(strategy, strategy.init(linear.init()), loader, steps=8, callbacks=[NanGuard()],
               checkpoint=CheckpointConfig(directory=ckdir, every_steps=1))
  # step 1's loss and gradient are finite; the update with lr 1e38 is not
  assert np.isfinite(result.history[0]["loss"]) and np.isfinite(result.history[0]["grad_norm"])
  assert result.failed and "the state after step 1 is not finite (inf or nan in ['params']['b']" in result.stop_reason
  assert not [p for p in ckdir.iterdir() if p.name.isdigit()]


class _StopAt(Callback):
  def __init__(self, step):
    self.step = step

  def on_step(self, loop, step, metrics):
    if step == self.step:
      loop.request_stop(f"asked at {step}")


@pytest.mark.parametrize("overlap,stop_at", [(False, 4), (True, 3)])
def test_a_stop_on_a_checkpoint_step_keeps_its_checkpoint(tmp_path, overlap, stop_at):
  strategy, state, loader = _setup()
  rec = Recorder()
  result = fit(strategy, state, loader, steps=10, callbacks=[_StopAt(stop_at), rec], overlap=overlap,
               checkpoint=CheckpointConfig(directory=tmp_path / "ckpt", every_steps=2, save_at_end=False))
  assert int(result.state.step) == 4 and not result.failed
  assert [s for e, s in rec.events if e == "checkpoint"] == [2, 4]


def test_eval_fn_that_returns_no_dict_is_an_error_before_training(tmp_path):
  strategy, state, loader = _setup()
  aux_style = lambda p, b: (mlp.loss(p, b), {"acc": mlp.accuracy(p, b)})
  with pytest.raises(ValueError, match="must return a dict of scalar metrics") as err:
    fit(strategy, state, loader, steps=6, eval_fn=aux_style, eval_data=_data(40, 1), eval_every=3,
        checkpoint=CheckpointConfig(directory=tmp_path / "ckpt", every_steps=3))
  assert "returned tuple" in str(err.value)
  assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()]  # no step ran


def test_a_run_that_ends_early_logs_and_evaluates_its_last_step(tmp_path):
  strategy, state, loader = _setup()
  batches = [b for b, _ in zip(loader, range(5))]
  result = fit(strategy, state, batches, steps=10, log_every=4, eval_fn=_eval_fn, eval_data=_data(40, 1),
               eval_every=100, run_dir=tmp_path, tensorboard=False)
  assert result.stop_reason == "the data ran out after step 5"
  assert [e["step"] for e in result.eval_history] == [5]
  records = read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], "loss" in r, "eval_loss" in r) for r in records] == [(4, True, False), (5, True, False),
                                                                           (5, False, True)]
  assert records[1]["loss"] == result.history[-1]["loss"]


def test_on_end_runs_when_fit_raises():
  strategy, state, loader = _setup()
  batches = [b for b, _ in zip(loader, range(3))]

  def data():
    yield from batches
    raise KeyboardInterrupt

  rec = Recorder()
  ended = []
  rec.on_end = lambda loop, result: ended.append((result.failed, result.stop_reason, len(result.history)))
  with pytest.raises(KeyboardInterrupt):
    fit(strategy, state, data(), steps=10, callbacks=[rec])
  assert ended == [(True, "KeyboardInterrupt at step 3", 3)]


def test_a_state_already_past_steps_runs_nothing():
  strategy, state, loader = _setup()
  done = fit(strategy, state, loader, steps=4)
  again = fit(strategy, done.state, loader, steps=2)
  assert again.stop_reason == "the state is already at step 4, past steps=2; nothing was run"
  assert int(again.state.step) == 4 and again.history == [] and not again.failed


def test_read_jsonl_skips_a_cut_last_line_and_names_a_damaged_one(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a JSON record"):
    read_jsonl(path)


def test_an_unreadable_checkpoint_is_named_by_its_first_line_only():
  from jdist.train._checkpoint import _reason
  error = ValueError('DATA_LOSS: Error reading "step/.zarray": Expected to start with hex bytes 0cdb20de; at byte 4 '
                     '[tensorstore_spec=\'{"driver":"zarr"}\'] See full TensorStore details: <bound method '
                     'pybind11_detail_function_record.spec of TensorStore({...})>\nsecond line')
  assert _reason(error) == 'ValueError: DATA_LOSS: Error reading "step/.zarray": Expected to start with hex bytes ' \
                           '0cdb20de; at byte 4'


def test_eval_fn_metrics_must_be_scalars():
  # per-example losses (a forgotten .mean()) used to be dropped from the logs and from EarlyStopping, silently
  strategy, state, loader = _setup()
  with pytest.raises(ValueError, match=r"must return a dict of scalars; these are not: \{'loss': \(8,\)\}"):
    fit(strategy, state, loader, steps=2, eval_fn=lambda p, b: {"loss": jax.vmap(lambda x, y: mlp.loss(
        p, {"x": x[None], "y": y[None]}))(b["x"], b["y"]), "accuracy": mlp.accuracy(p, b)}, eval_data=_data(8),
        eval_every=1)


def test_early_stopping_on_a_metric_the_run_does_not_log_is_an_error():
  strategy, state, loader = _setup()
  stopper = jdist.train.EarlyStopping("val_loss", patience=1)  # another library's name; jdist logs eval_loss
  with pytest.raises(ValueError, match=r"monitors 'val_loss', but the run's steps report \['grad_norm', 'loss'\]"):
    fit(strategy, state, loader, steps=2, callbacks=[stopper])
  with pytest.raises(ValueError, match=r"monitors 'eval_loss', an evaluation metric, but the run has no eval_fn"):
    fit(*_setup(), steps=2, callbacks=[jdist.train.EarlyStopping()])  # would never see an evaluation
  stopper = jdist.train.EarlyStopping("eval_acc", patience=1)
  strategy, state, loader = _setup()
  with pytest.raises(ValueError, match=r"monitors 'eval_acc', but the run's evaluations report \['eval_accuracy', "):
    fit(strategy, state, loader, steps=2, eval_fn=_eval_fn, eval_data=_data(8), eval_every=1, callbacks=[stopper])


def test_a_checkpoint_never_holds_a_non_finite_optimizer_state(tmp_path):
  # one outlier batch overflows Adam's second moment while the parameters stay finite (update m/sqrt(inf) = 0)
  strategy, state, loader = _setup()
  batches = [b for b, _ in zip(loader, range(4))]
  batches[2] = dict(batches[2], x=batches[2]["x"] * np.float32(1e25))
  result = fit(strategy, state, batches, steps=4, checkpoint=CheckpointConfig(directory=tmp_path, every_steps=1))
  assert result.failed and "not finite (inf or nan in ['opt_state']" in result.stop_reason
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2"]


def test_state_kept_per_device_resumes_only_on_as_many_devices_and_says_so(tmp_path):
  params = mlp.init(jax.random.key(0), [6, 16, 3])
  ck = CheckpointConfig(directory=tmp_path, every_steps=2)
  on = lambda n: jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=n, devices=jax.devices()[:n]),
                                     reducer=jdist.reducers.int8())  # one error-feedback residual row per device
  four = on(4)
  fit(four, four.init(params), ArrayLoader(_data(), 32), steps=2, checkpoint=ck)
  two = on(2)
  with pytest.raises(CheckpointError, match=r"number of devices .* extra/reducer/per_device/.* one row each, and that "
                                            r"checkpoint has 4, this run 2"):
    fit(two, two.init(params), ArrayLoader(_data(), 32), steps=4, checkpoint=ck)


def test_a_checkpoint_never_holds_non_finite_local_replicas(tmp_path):
  # local SGD trains replicas between syncs while params stays the last average: an update that overflows in
  # the replicas must stop the run as one in params does, not be kept as "the last good checkpoint"
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)  # finite loss and gradient; lr * grad overflows
  batches = [{"x": np.full((4, 2), 1e9, np.float32), "y": np.zeros((4, 1), np.float32)}] * 4
  mesh = jdist.make_mesh(data=2, devices=jax.devices()[:2])
  strategy = jdist.local_sgd(loss, optax.sgd(1e21), mesh, sync_every=4)
  result = fit(strategy, strategy.init({"w": jnp.ones((2, 1), jnp.float32)}), batches, steps=4,
               checkpoint=CheckpointConfig(directory=tmp_path, every_steps=1))
  assert result.failed and "state after step 1 is not finite" in result.stop_reason
  assert "['extra']['replicas']['w']" in result.stop_reason
  assert not any(p.name.isdigit() for p in tmp_path.iterdir())


def test_a_plain_iterator_cannot_resume_from_a_checkpoint_older_than_the_state(tmp_path):
  batches = [b for b, _ in zip(ArrayLoader(_data(), 32, seed=3), range(6))]
  strategy, state, _ = _setup()
  ckpt = CheckpointConfig(directory=tmp_path, every_steps=2, save_at_end=False)
  data = iter(batches)
  first = fit(strategy, state, data, steps=3, checkpoint=ckpt)  # checkpoint at 2, state at 3
  with pytest.raises(CheckpointError, match=r"state passed in is at step 3 but the newest checkpoint is at step 2.*"
                                            r"would skip 1 batch"):
    fit(strategy, first.state, data, steps=6, checkpoint=ckpt)


def test_a_fresh_run_purges_the_tensorboard_events_of_an_earlier_one(tmp_path):
  # metrics.jsonl is cut back to step 0; TensorBoard must drop the old run's events too, not overlay them
  import struct

  from tensorboardX.proto import event_pb2

  for seed in (0, 1):
    strategy, state, loader = _setup(seed=seed)
    fit(strategy, state, loader, steps=4, run_dir=tmp_path, log_every=2)

  def events(path):
    buf, i = path.read_bytes(), 0
    while i < len(buf):
      (n,) = struct.unpack("<Q", buf[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(buf[i + 12:i + 12 + n])
      i += 16 + n
      yield event

  newest = sorted((tmp_path / "tensorboard").iterdir())[-1]
  purges = [e.step for e in events(newest) if e.HasField("session_log")]  # TensorBoard drops older events >= it
  assert purges == [1]


class _InterruptAt(Callback):
  """Raises KeyboardInterrupt (a Ctrl-C) from ``hook`` at ``step``."""

  def __init__(self, hook, step):
    self.hook, self.step = hook, step

  def on_step(self, loop, step, metrics):
    if self.hook == "on_step" and step == self.step:
      raise KeyboardInterrupt

  def on_checkpoint(self, loop, step, path):
    if self.hook == "on_checkpoint" and step == self.step:
      raise KeyboardInterrupt


def _interrupted_then_resumed(tmp_path, name, make_callbacks, interrupt, **kwargs):
  """The run of ``fit(**kwargs)`` interrupted as ``interrupt`` says, then resumed: (result, its run dir)."""
  run = tmp_path / name
  ckpt = CheckpointConfig(directory=run / "ckpt", every_steps=kwargs.pop("every_steps"))
  strategy, state, loader = _setup()
  if interrupt is not None:
    with pytest.raises(KeyboardInterrupt):
      fit(strategy, state, loader, run_dir=run, checkpoint=ckpt, callbacks=[*make_callbacks(), interrupt],
          **kwargs)
    strategy, state, loader = _setup()
  return fit(strategy, state, loader, run_dir=run, checkpoint=ckpt, callbacks=make_callbacks(), **kwargs), run


def test_early_stopping_resumes_where_it_was(tmp_path):
  # its counters are saved with each checkpoint: killed and resumed, it stops where the uninterrupted run does
  kw = dict(steps=40, every_steps=3, log_every=1, tensorboard=False, overlap=False)
  stopper = lambda: [jdist.train.EarlyStopping("step", patience=6)]  # the step never decreases: stops at 1 + 6
  full, full_dir = _interrupted_then_resumed(tmp_path, "full", stopper, None, **kw)
  assert int(full.state.step) == 7 and "early stopping at step 7" in full.stop_reason
  resumed, resumed_dir = _interrupted_then_resumed(tmp_path, "cut", stopper, _InterruptAt("on_step", 4), **kw)
  assert resumed.start_step == 3 and int(resumed.state.step) == 7, resumed.stop_reason  # not 3 + 7 = 10
  _leaves_equal(resumed.state.params, full.state.params)
  assert (resumed_dir / "metrics.jsonl").read_bytes() == (full_dir / "metrics.jsonl").read_bytes()


def test_an_interrupt_after_a_checkpoint_loses_no_evaluation(tmp_path):
  # the evaluation of a checkpoint's step runs before it is saved, so a Ctrl-C after the save cannot drop it
  kw = dict(steps=12, every_steps=4, eval_fn=_eval_fn, eval_data=_data(16, seed=1), eval_every=4, log_every=4,
            tensorboard=False)
  _, full_dir = _interrupted_then_resumed(tmp_path, "full", list, None, **kw)
  _, cut_dir = _interrupted_then_resumed(tmp_path, "cut", list, _InterruptAt("on_checkpoint", 8), **kw)
  assert [r["step"] for r in read_jsonl(cut_dir / "metrics.jsonl") if "eval_loss" in r] == [4, 8, 12]
  assert (cut_dir / "metrics.jsonl").read_bytes() == (full_dir / "metrics.jsonl").read_bytes()


def test_fit_result_repr_is_short():
  from jdist.models import linear

  strategy = jdist.data_parallel(linear.loss, optax.sgd(0.01), jdist.make_mesh(data=2, devices=jax.devices()[:2]))
  x = np.arange(8, dtype=np.float32).reshape(-1, 1)
  result = fit(strategy, strategy.init(linear.init()), [{"x": x, "y": 2 * x + 1}] * 3, steps=3, tensorboard=False)
  text = repr(result)
  assert text.startswith("FitResult(steps 0 -> 3, loss ") and "3 history rows" in text and len(text) < 200, text


class _SignalAt(Callback):
  """Sends ``sig`` to this process after step ``at`` (as a scheduler or Ctrl-C would)."""

  def __init__(self, sig, at):
    self.sig, self.at = sig, at

  def on_step(self, loop, step, metrics):
    if step == self.at:
      import os
      os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_saves_it_and_raises(tmp_path, capsys, sig):
  import signal

  from jdist.train import Interrupted, Terminated
  sig = getattr(signal, sig)
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  strategy, state, loader = _setup()
  full = fit(strategy, state, loader, steps=12)
  strategy, state, loader = _setup()
  ckpt = CheckpointConfig(directory=tmp_path / "ck", every_steps=100)
  with pytest.raises(Terminated if sig == signal.SIGTERM else Interrupted) as stopped:
    fit(strategy, state, loader, steps=12, checkpoint=ckpt, callbacks=[_SignalAt(sig, 4)])
  assert isinstance(stopped.value, SystemExit if sig == signal.SIGTERM else KeyboardInterrupt)
  if sig == signal.SIGTERM:
    assert stopped.value.code == 143
  k = stopped.value.step  # the step running when the signal came (with overlap, the one dispatched after step 4)
  assert k in (4, 5, 6) and stopped.value.checkpoint == str(tmp_path / "ck" / str(k))
  assert (tmp_path / "ck" / str(k)).is_dir()
  assert f"finished step {k} and saved it ({tmp_path / 'ck' / str(k)}); run again to resume from step {k}" in (
      capsys.readouterr().err)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers put back
  strategy, state, loader = _setup()
  resumed = fit(strategy, state, loader, steps=12, checkpoint=ckpt)
  assert resumed.start_step == k
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.state)), jax.tree.leaves(jax.device_get(full.state))):
    np.testing.assert_array_equal(a, b)


def test_a_signal_without_checkpoints_says_nothing_was_saved(capsys):
  import signal

  from jdist.train import Terminated
  strategy, state, loader = _setup()
  with pytest.raises(Terminated) as stopped:
    fit(strategy, state, loader, steps=10, callbacks=[_SignalAt(signal.SIGTERM, 2)], overlap=False)
  assert stopped.value.step == 3 and stopped.value.checkpoint is None  # the step after the signal finished
  assert "no checkpoint was written (fit has no checkpoint=)" in capsys.readouterr().err


def test_checkpointer_meta_is_the_callers_alone(tmp_path):
  from jdist.train import Checkpointer
  from jdist.train._checkpoint import _caller_meta
  strategy, state, _ = _setup()
  ckpt = Checkpointer(CheckpointConfig(directory=tmp_path / "own"))
  ckpt.save(7, state, {"step": "mine", "epoch": 3, "checksums": [1]})  # keys jdist also uses, kept apart
  step, restored, meta = ckpt.restore_latest(state)
  assert step == 7 and meta == {"step": "mine", "epoch": 3, "checksums": [1]}
  assert int(restored.step) == int(state.step)
  with pytest.raises(TypeError, match="JSON-able"):
    ckpt.save(8, state, {"array": np.zeros(2)})
  ckpt.close()
  # a checkpoint of format 1 (before 2026-12) kept fit's position beside jdist's keys
  assert _caller_meta({"step": 3, "checksums": [], "format": 1, "data": {"epoch": 0}}) == {"data": {"epoch": 0}}
