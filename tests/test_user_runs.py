"""The run a user brings: their own model (flax NNX, dropout), data and optax schedule in their own package, trained
by ``jdist train my.toml`` on 8 emulated devices under data parallel and FSDP; SIGTERM / SIGINT finish the step,
save it and exit 143 / 130, and the resumed run ends bit for bit where the uninterrupted one does. Also: the run
dir keeps the resolved config and refuses a resume with another one; the bundled GPT trains on real text."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import tomllib

import jax
import numpy as np
import pytest

from jdist import config as config_lib
from jdist.cli import main
from jdist.experiment import build
from jdist.train import CheckpointConfig, Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODELS_PY = '''
import jax
import optax
from flax import nnx

import jdist
from jdist.models import Model


class Net(nnx.Module):
  def __init__(self, hidden, dropout, rngs):
    self.l1 = nnx.Linear(16, hidden, rngs=rngs)
    self.drop = nnx.Dropout(dropout)  # no rngs here: the loss passes the step's key
    self.l2 = nnx.Linear(hidden, 4, rngs=rngs)

  def __call__(self, x, key=None):
    return self.l2(self.drop(nnx.relu(self.l1(x)), rngs=key, deterministic=key is None))


def build(key, *, hidden=32, dropout=0.1):
  graphdef, params, rest = nnx.split(Net(hidden, dropout, nnx.Rngs(key)), nnx.Param, ...)

  def logits(params, x, key=None):
    return nnx.merge(graphdef, params, rest)(x, key)

  @jdist.takes_key
  def loss(params, batch, key):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, batch["x"], key), batch["y"]).mean()

  def evaluate(params, batch):  # dropout off
    out = logits(params, batch["x"])
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean(),
            "accuracy": (out.argmax(-1) == batch["y"]).mean()}

  return Model(params=params, loss=loss, eval=evaluate)
'''

DATA_PY = '''
import numpy as np


def load(*, n=1024, noise=0.5):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 16)).astype(np.float32)
  y = (x[:, :4] + noise * rng.normal(size=(n, 4))).argmax(-1).astype(np.int32)
  return {"x": x[:896], "y": y[:896]}, {"x": x[896:], "y": y[896:]}
'''

CONFIG = '''
run_dir = "{run_dir}"

[model]
name = "mypkg.models:build"
hidden = 64
dropout = 0.2

[data]
name = "mypkg.data:load"
batch_size = 64
noise = 0.3

[optimizer]
name = "chain"
[[optimizer.args]]
name = "clip_by_global_norm"
max_norm = 1.0
[[optimizer.args]]
name = "adamw"
weight_decay = 1e-3
[optimizer.args.learning_rate]  # the schedule, a table of the last [[optimizer.args]] (adamw's learning_rate)
name = "warmup_cosine_decay_schedule"
init_value = 0.0
peak_value = 1e-2
warmup_steps = 5
decay_steps = 40

{strategy}

[train]
steps = {steps}
log_every = 1
eval_every = 10
progress = false

[checkpoint]
every_steps = 10
'''

STRATEGIES = {"data_parallel": '[strategy]\nname = "data_parallel"\n\n[mesh]\ndata = 8',
              "fsdp": '[strategy]\nname = "fsdp"\nmin_size = 256\n\n[mesh]\nfsdp = 8'}


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
  """A directory holding the user's package ``mypkg`` (importable here as from a run in that directory)."""
  (tmp_path / "mypkg").mkdir()
  (tmp_path / "mypkg" / "__init__.py").write_text("")
  (tmp_path / "mypkg" / "models.py").write_text(textwrap.dedent(MODELS_PY))
  (tmp_path / "mypkg" / "data.py").write_text(textwrap.dedent(DATA_PY))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.chdir(tmp_path)
  for module in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
    monkeypatch.delitem(sys.modules, module)
  return tmp_path


def _config(directory, name, strategy="data_parallel", steps=40):
  path = directory / f"{name}.toml"
  path.write_text(CONFIG.format(run_dir=directory / name, strategy=STRATEGIES[strategy], steps=steps))
  return path


def _final_state(config_path):
  cfg = config_lib.load(config_path)
  ckpt = Checkpointer(CheckpointConfig(directory=pathlib.Path(cfg.run_dir) / "checkpoints"))
  step, state, _ = ckpt.restore_latest(build(cfg).state)
  ckpt.close()
  return step, jax.device_get(state)


def _interrupt(config_path, sig, at_step, directory, attempts=3):
  """Runs ``jdist train`` in a subprocess and sends ``sig`` once it printed step ``at_step``; returns the process's
  exit code, stdout and stderr. A run that finishes before the signal lands is started again (a busy machine)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{directory}")
  for _ in range(attempts):
    run_dir = directory / config_path.stem
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    proc = subprocess.Popen([sys.executable, "-m", "jdist.cli", "train", str(config_path)], cwd=directory,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    lines = []
    try:
      for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and int(line.split()[1]) >= at_step:
          proc.send_signal(sig)
          break
      out, err = proc.communicate(timeout=120)
    finally:
      watchdog.cancel()
    if proc.returncode != 0:
      return proc.returncode, "".join(lines) + out, err
  raise AssertionError(f"the run ended before the signal at step {at_step}, {attempts} times")


@pytest.mark.parametrize("strategy,sig", [("data_parallel", signal.SIGTERM), ("fsdp", signal.SIGINT)])
def test_user_model_trains_and_resumes_after_a_signal_bit_for_bit(user_dir, capsys, strategy, sig):
  full = _config(user_dir, "full", strategy)
  assert main(["train", str(full), "--quiet"]) == 0
  ref_step, ref_state = _final_state(full)
  assert ref_step == 40
  records = [json.loads(line) for line in (user_dir / "full" / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # it learns, dropout and all
  assert any("eval_accuracy" in r for r in records)

  cfg = _config(user_dir, "stopped", strategy)
  code, out, err = _interrupt(cfg, sig, at_step=12, directory=user_dir)
  assert code == 128 + sig, (code, err[-2000:])
  saved = sorted(int(p.name) for p in (user_dir / "stopped" / "checkpoints").iterdir() if p.name.isdigit())
  stop = saved[-1]
  assert stop >= 12 and f"finished step {stop} and saved it" in err and f"resume from step {stop}" in err, err
  event = json.loads((user_dir / "stopped" / "events.jsonl").read_text().splitlines()[-1])
  assert event["event"] == "interrupted" and event["signal"] == sig.name and event["step"] == stop
  capsys.readouterr()
  assert main(["train", str(cfg), "--quiet"]) == 0
  assert f"resumed from step {stop} (checkpoint {user_dir / 'stopped' / 'checkpoints' / str(stop)})" in (
      capsys.readouterr().out)
  step, state = _final_state(cfg)
  assert step == 40
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (user_dir / "stopped" / "metrics.jsonl").read_bytes() == (user_dir / "full" / "metrics.jsonl").read_bytes()


def test_run_dir_keeps_the_config_and_refuses_another(user_dir, capsys):
  cfg = _config(user_dir, "run", steps=10)
  assert main(["train", str(cfg), "--quiet"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"run dir {user_dir / 'run'}\n")
  saved = tomllib.loads((user_dir / "run" / "config.toml").read_text())
  assert config_lib.from_dict(saved) == config_lib.load(cfg)  # the resolved config, defaults filled in
  assert saved["optimizer"]["args"][1]["learning_rate"]["peak_value"] == 1e-2 and saved["data"]["seed"] == 0
  # what the run computes may not change on a resume: the keys are named, nothing runs
  code = main(["train", str(cfg), "--set", "optimizer.args.1.weight_decay=0.1", "--set", "model.dropout=0.5",
               "--set", "train.steps=20"])
  err = capsys.readouterr().err
  assert code == 2 and "holds checkpoints of a run with another config" in err
  assert "model.dropout: 0.2 -> 0.5" in err and "optimizer.args" in err and "--allow-config-change" in err
  assert "train.steps" not in err  # extending a run is not a change of what it computes
  # ... unless allowed, which the run's events record
  assert main(["train", str(cfg), "--quiet", "--set", "model.dropout=0.5", "--set", "train.steps=12",
               "--allow-config-change"]) == 0
  assert "resumed from step 10" in capsys.readouterr().out
  events = [json.loads(line) for line in (user_dir / "run" / "events.jsonl").read_text().splitlines()]
  change = next(e for e in events if e["event"] == "config_change")
  assert change["changes"] == {"model.dropout": [0.2, 0.5]}
  assert tomllib.loads((user_dir / "run" / "config.toml").read_text())["model"]["dropout"] == 0.5
  # a longer run of the same config resumes without a word about the config
  assert main(["train", str(cfg), "--quiet", "--set", "model.dropout=0.5", "--set", "train.steps=14"]) == 0


def test_fit_says_where_it_resumed_and_a_finished_run_says_so(tmp_path, capsys):
  import optax

  import jdist
  from jdist.data import ArrayLoader
  from jdist.models import mlp
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(64, 4)).astype(np.float32), "y": rng.integers(0, 3, 64).astype(np.int32)}
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=-1))
  ckpt = CheckpointConfig(directory=tmp_path / "ck", every_steps=3)
  params = mlp.init(jax.random.key(0), [4, 8, 3])
  jdist.fit(strategy, strategy.init(params), ArrayLoader(data, 16), steps=3, checkpoint=ckpt)
  assert "resumed" not in capsys.readouterr().out
  result = jdist.fit(strategy, strategy.init(params), ArrayLoader(data, 16), steps=3, checkpoint=ckpt)
  assert f"resumed from step 3 (checkpoint {tmp_path / 'ck' / '3'}); steps=3 are done, nothing to run" in (
      capsys.readouterr().out)
  assert result.resumed_from == str(tmp_path / "ck" / "3") and "3 -> 3" in repr(result)


def test_gpt_configs_train_on_stdlib_text_under_every_strategy(tmp_path):
  """The bundled GPT on the standard library's source bytes: the four configs compute the same first steps (data
  parallel, shard_map FSDP, data x FSDP x tensor parallel, data x pipeline; shrunk here to compile fast), and the
  data-parallel one goes on to learn the text."""
  from jdist.datasets import stdlib_text
  train, test = stdlib_text(64)
  assert train["tokens"].shape[1] == 65 and len(train["tokens"]) > 50_000 and test["tokens"].shape == (256, 65)
  small = ["model.d_model=32", "model.seq_len=16", "data.seq_len=16", "data.max_bytes=400000",
           "checkpoint.enabled=false", "optimizer.args.1.learning_rate.warmup_steps=5"]
  losses, runs = {}, {}
  for name in ("gpt_data_parallel", "gpt_fsdp", "gpt_tensor_parallel", "gpt_pipeline"):
    exp = build(config_lib.load(ROOT / "examples" / "configs" / f"{name}.toml", small + [f"run_dir={tmp_path}"]))
    runs[name] = exp, exp.state, iter(exp.loader)
    losses[name] = [float(_step(runs, name)["loss"]) for _ in range(2)]
  for name, got in losses.items():
    np.testing.assert_allclose(got, losses["gpt_data_parallel"], rtol=2e-5, err_msg=name)
  assert abs(losses["gpt_data_parallel"][0] - np.log(256)) < 0.3  # bytes start near uniform
  later = [float(_step(runs, "gpt_data_parallel")["loss"]) for _ in range(40)]
  assert np.mean(later[-5:]) < 3.6, later  # the byte frequencies and more: below ln 256 = 5.55 by 2 nats


def _step(runs, name):
  exp, state, batches = runs[name]
  state, metrics = exp.strategy.step(state, exp.strategy.shard_batch(next(batches)))
  runs[name] = exp, state, batches
  return metrics


PLAIN_PY = '''
import jax
import jax.numpy as jnp

import jdist


def init(key, *, width=8):  # the params alone: the loss comes from [loss]
  return {"w": jax.random.normal(key, (16, width)) * 0.1, "v": jnp.zeros((width, 4))}


@jdist.takes_key
def loss(params, batch, key, *, scale=1.0, rate=0.5):
  h = jnp.tanh(batch["x"] @ params["w"])
  h = jnp.where(jax.random.bernoulli(key, 1 - rate, h.shape), h / (1 - rate), 0.0)
  logits = h @ params["v"]
  return scale * -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["y"]])
'''


def test_a_loss_section_names_the_loss_and_binds_its_keys(user_dir):
  (user_dir / "mypkg" / "plain.py").write_text(textwrap.dedent(PLAIN_PY))
  raw = {"model": {"name": "mypkg.plain:init", "width": 8}, "data": {"name": "mypkg.data:load", "batch_size": 64},
         "loss": {"name": "mypkg.plain:loss", "rate": 0.25}, "checkpoint": {"enabled": False},
         "strategy": {"name": "local_sgd", "sync_every": 2}}
  losses = []
  for scale in (1.0, 3.0):
    exp = build(config_lib.from_dict({**raw, "loss": {**raw["loss"], "scale": scale}}))
    assert exp.eval_fn is None  # a loss with a key and no Model.eval: no evaluation (dropout would be on)
    _, metrics = exp.strategy.step(exp.state, exp.strategy.shard_batch(next(iter(exp.loader))))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[1], 3 * losses[0], rtol=1e-6)
  with pytest.raises(config_lib.ConfigError, match=r"Unknown key in \[loss\]: 'scal'. .* Did you mean 'scale'\?"):
    config_lib.from_dict({**raw, "loss": {**raw["loss"], "scal": 2.0}})
  with pytest.raises(config_lib.ConfigError, match="returned no loss: return a jdist.models.Model with loss="):
    build(config_lib.from_dict({**raw, "loss": {}}))
