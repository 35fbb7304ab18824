"""The jdist CLI: train resumes after SIGKILL bit for bit; bad input ends in one line and a non-zero exit."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import tomllib

import jax
import numpy as np
import pytest

from jdist import config as config_lib
from jdist.cli import main
from jdist.experiment import build
from jdist.train import CheckpointConfig, Checkpointer

CONFIG = """
run_dir = "{run_dir}"
[model]
hidden = [32]
[data]
batch_size = 64
[optimizer]
name = "adam"
lr = 0.003
[strategy]
name = "{strategy}"
{strategy_options}
[mesh]
{mesh}
[train]
steps = 30
log_every = 1
eval_every = 10
progress = false
[checkpoint]
every_steps = 5
"""


@pytest.fixture(autouse=True)
def _restore_process_hooks():
  """`main` quiets orbax's closed-loop tracebacks with process-wide hooks (the CLI owns its process);
  here the process is pytest's, shared with later tests, so put them back after each test."""
  import logging

  asyncio_logger = logging.getLogger("asyncio")
  saved = threading.excepthook, sys.unraisablehook, asyncio_logger.level
  yield
  threading.excepthook, sys.unraisablehook = saved[:2]
  asyncio_logger.setLevel(saved[2])


def _write_config(tmp_path, name, strategy="data_parallel", strategy_options="", mesh="data = -1"):
  path = tmp_path / f"{name}.toml"
  path.write_text(CONFIG.format(run_dir=tmp_path / name, strategy=strategy, strategy_options=strategy_options,
                                mesh=mesh))
  return path


SETUPS = {
    "data_parallel": {},
    "sharded_tp_fsdp": {"strategy": "sharded", "strategy_options": 'rules = "tp"\nfsdp_axis = "fsdp"',
                        "mesh": "fsdp = 2\nmodel = 4"},
}
# the five kill points shared between the setups (each kill and restart is two processes compiling the step)
KILL_AT = {"data_parallel": (8, 17), "sharded_tp_fsdp": (3, 12, 26)}


def _train_cmd(config):
  return [sys.executable, "-m", "jdist.cli", "train", str(config)]


def _run_until_killed(config, run_dir, kill_at, attempts=3):
  """Starts `jdist train`, SIGKILLs it once it reports step `kill_at`; returns the last step it printed.

  A late kill point is under a second from the end of the run: if the run finishes before the signal
  lands (a busy machine), it starts again from an empty run directory, up to ``attempts`` times. A
  watchdog kills a run that stops printing, so a hang fails the test instead of the whole CI job.
  """
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  for _ in range(attempts):
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = subprocess.Popen(_train_cmd(config), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    last = 0
    try:
      for line in proc.stdout:
        if line.startswith("step"):
          last = int(line.split()[1])
          if last >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
      proc.wait(timeout=60)
    finally:
      watchdog.cancel()
    assert last >= kill_at or proc.returncode == 0, f"the run stopped at step {last} before step {kill_at}"
    if proc.returncode == -signal.SIGKILL:
      return last
  raise AssertionError(f"the run ended by itself before the kill at step {kill_at}, {attempts} times")


def _final_state(config_path):
  cfg = config_lib.load(config_path)
  template = build(cfg).state
  ckpt = Checkpointer(CheckpointConfig(directory=pathlib.Path(cfg.run_dir) / "checkpoints"))
  step, state, _ = ckpt.restore_latest(template)
  ckpt.close()
  return step, jax.device_get(state)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_sigkill_at_five_steps_then_restart_equals_uninterrupted(tmp_path, setup):
  full = _write_config(tmp_path, "full", **SETUPS[setup])
  subprocess.run(_train_cmd(full), check=True, capture_output=True, timeout=300)
  ref_step, ref_state = _final_state(full)
  ref_log = (tmp_path / "full" / "metrics.jsonl").read_bytes()
  assert ref_step == 30
  for kill_at in KILL_AT[setup]:
    cfg = _write_config(tmp_path, f"killed_{kill_at}", **SETUPS[setup])
    _run_until_killed(cfg, tmp_path / f"killed_{kill_at}", kill_at)
    done = subprocess.run(_train_cmd(cfg), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    step, state = _final_state(cfg)
    assert step == 30
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
      np.testing.assert_array_equal(a, b, err_msg=f"killed at step {kill_at}")
    assert (tmp_path / f"killed_{kill_at}" / "metrics.jsonl").read_bytes() == ref_log, f"killed at {kill_at}"


def _cli_error(capsys, argv):
  code = main(argv)
  err = capsys.readouterr().err.strip()
  assert code != 0
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  return err


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
  err = _cli_error(capsys, ["train", str(tmp_path / "missing.toml")])
  assert "missing.toml' does not exist" in err
  cfg = _write_config(tmp_path, "bad_strategy", strategy="data_paralel")
  err = _cli_error(capsys, ["train", str(cfg)])
  assert "Unknown strategy 'data_paralel'" in err and "did you mean 'data_parallel'" in err
  cfg = _write_config(tmp_path, "big_mesh")
  err = _cli_error(capsys, ["train", str(cfg), "--set", "mesh.data=16"])
  assert "needs 16 devices but only 8 are available" in err and "--set mesh.cpu_devices=16" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "mesh.data=4"])  # a CLI fix, not make_mesh's devices=...
  assert "uses 4 devices but 8 are available" in err and "--set mesh.num_devices=4" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "optimizer.weight_decy=0.1"])
  assert "Unknown key in [optimizer]: 'weight_decy'" in err and "Did you mean 'weight_decay'" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "strategy.acumulate_steps=2"])
  assert "Unknown option 'acumulate_steps'" in err and "Did you mean 'accumulate_steps'" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "optimizer.lr"])
  assert "not of the form section.key=value" in err
  err = _cli_error(capsys, ["train", str(tmp_path)])
  assert "is a directory. Pass a TOML file" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "run_dir="])  # not the current directory
  assert "run_dir must name a directory for the run's logs and checkpoints, got ''" in err
  assert main(["train", str(cfg), "--set", "strategy.accumulate_steps=0"]) == 2  # the strategy refuses a value
  err = capsys.readouterr().err
  assert "jdist train: error: strategy 'data_parallel': accumulate_steps must be a positive int" in err
  err = _cli_error(capsys, ["train", str(cfg), "--set", "mesh.data=2", "--set", "mesh.model=4"])  # model unused
  assert ("'model' of size 4: the devices along it would each compute the same thing. Name it in the strategy's "
          "options, or drop it from [mesh] (--unset mesh.model) and use 2 device(s) (--set mesh.num_devices=2)") in err
  pipe = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs" / "pipeline.toml"
  err = _cli_error(capsys, ["train", str(pipe), "--set", "strategy.schedule=circular", "--set", "strategy.repeats=0",
                            "--set", f"run_dir={tmp_path / 'pipe'}"])  # 0 was taken as "not set": 2 repeats
  assert "strategy 'pipeline': repeats must be a positive int, got 0" in err


def test_cli_read_only_run_dir(tmp_path, capsys):
  cfg = _write_config(tmp_path, "ro")
  # /proc cannot hold new directories even for root, which ignores permission bits
  err = _cli_error(capsys, ["train", str(cfg), "--set", 'run_dir="/proc/jdist_run"'])
  assert "/proc/jdist_run" in err
  if os.geteuid() != 0:
    ro = tmp_path / "ro_dir"
    ro.mkdir()
    ro.chmod(0o555)
    err = _cli_error(capsys, ["train", str(cfg), "--set", f'run_dir="{ro}/run"'])
    assert "ro_dir" in err


def test_cli_train_resumes_and_plot(tmp_path, capsys):
  cfg = _write_config(tmp_path, "run")
  assert main(["train", str(cfg), "--quiet", "--set", "train.steps=10"]) == 0
  capsys.readouterr()
  assert main(["train", str(cfg), "--set", "train.steps=20", "--set", "train.progress=false",
               "--set", "train.log_every=5"]) == 0
  out = capsys.readouterr().out
  # said before the steps it runs, not after them
  assert out.index("resumed from step 10") < out.index("step     15") < out.index("step 20")
  assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "m.png")]) == 0
  assert (tmp_path / "m.png").stat().st_size > 10_000
  capsys.readouterr()
  err = _cli_error(capsys, ["plot", str(tmp_path / "run"), "--metric", "los", "--out", str(tmp_path / "x.png")])
  assert "No run logged ['los']; the metrics in" in err and "'loss'" in err
  assert not (tmp_path / "x.png").exists()
  # a line cut by a crash (or still being written) at the end of the log does not stop the plot
  with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
    f.write('{"step": 21, "lo')
  assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "m2.png")]) == 0
  # a record that is not jdist.fit's (no step) is a one-line error, not a KeyError traceback
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "metrics.jsonl").write_text('{"loss": 1.0}\n')
  err = _cli_error(capsys, ["plot", str(tmp_path / "other"), "--out", str(tmp_path / "y.png")])
  assert "line 1: expected an object with an integer 'step'" in err
  from jdist.analysis.plot import plot_runs
  with pytest.raises(ValueError, match="Got 1 labels for 2 run directories"):
    plot_runs([tmp_path / "run", tmp_path / "run"], tmp_path / "z.png", labels=["a"])
  with pytest.raises(ValueError, match="metrics is empty"):
    plot_runs([tmp_path / "run"], tmp_path / "z.png", metrics=[])
  assert plot_runs(str(tmp_path / "run"), tmp_path / "one.png").exists()  # one directory, not its characters


def test_cli_demo_steps_must_be_positive(capsys):
  err = _cli_error(capsys, ["demo", "--steps", "0"])
  assert "--steps must be a positive int (steps per strategy), got 0" in err
  err = _cli_error(capsys, ["demo", "--devices", "0"])
  assert "--devices must be a positive int (CPU devices to emulate), got 0" in err


def test_cli_nan_exits_nonzero(tmp_path, capsys):
  cfg = _write_config(tmp_path, "nan")
  code = main(["train", str(cfg), "--quiet", "--set", "optimizer.lr=1e30", "--set", "optimizer.name='sgd'"])
  captured = capsys.readouterr()
  assert code == 1
  assert "is nan at step" in captured.err or "is inf at step" in captured.err


@pytest.mark.parametrize("bad,match", [
    ({"model": {"hiden": [3]}}, "Unknown key in [model]: 'hiden'. Valid keys: classes, hidden, in_features, name. "
                                "Did you mean 'hidden'?"),  # the keys are the bundled mlp's parameters
    ({"optimiser": {}}, "Unknown key 'optimiser'"),
    ({"optimizer": {"name": "adamm"}}, "did you mean 'adam'?"),
    ({"train": {"steps": 0}}, "train.steps must be a positive int, got 0"),
    ({"steps": 5}, "Unknown key 'steps'. Valid keys: checkpoint, data, loss, mesh, model, optimizer, run_dir, "
                   "strategy, train. Did you mean 'train.steps'?"),  # a section's key at the top level
    ({"learning_rate": 0.1}, "Did you mean 'optimizer.learning_rate'?"),
    ({"lr": 0.1}, "Did you mean 'optimizer.learning_rate'?"),
    ({"seed": 1}, "Did you mean 'data.seed' or 'train.seed'?"),
    ({"mesh": {"num_devices": True}}, "mesh.num_devices must be an int >= 0 (0: all devices), got True"),
    # a misspelt option would become a mesh axis of size 4: every step computed 4 times over
    ({"mesh": {"num_device": 4}}, "mesh.num_device looks like a misspelt mesh.num_devices"),
    ({"mesh": {"nun_devices": 4}}, "mesh.nun_devices looks like a misspelt mesh.num_devices"),
    ({"mesh": {"devices": 8}}, "mesh.devices cannot name a mesh axis"),
    ({"optimizer": {"name": "sgd", "momentum": 1.5}}, "optimizer.momentum must be in [0, 1), got 1.5"),
    ({"optimizer": {"name": "adamm"}}, "Unknown optimizer.name: 'adamm'. It needs to be a function of optax"),
    ({"optimizer": {"weight_decy": 0.1}}, "Did you mean 'weight_decay'? It is an argument of optax.adamw"),
    ({"optimizer": {"name": "adamw", "learning_rate": {"name": "warmup_cosine_decay_schedule", "peak_valu": 1}}},
     "Unknown key in [optimizer.learning_rate]: 'peak_valu'. Valid keys: decay_steps, end_value, exponent, "
     "init_value, name, peak_value, warmup_steps. Did you mean 'peak_value'?"),  # a schedule's keys too
    ({"optimizer": {"name": "chain", "args": [{"name": "clip_by_global_nrm"}]}},
     "Unknown optimizer.args.0.name: 'clip_by_global_nrm'. It needs to be a function of optax or an import path "
     "'package.module:function'; did you mean 'clip_by_global_norm'?"),
    ({"optimizer": {"name": "adamw", "learning_rate": {"name": "warmup_cosine_decay_schedule", "init_value": 0.0}}},
     "[optimizer.learning_rate] name = 'warmup_cosine_decay_schedule' needs 'peak_value', 'warmup_steps', "
     "'decay_steps'"),
    ({"model": {"name": "gpt", "d_modle": 64}}, "Did you mean 'd_model'?"),
    ({"model": {"name": "mypkg_that_is_not_there.models:build"}}, "no module named 'mypkg_that_is_not_there'"),
    ({"model": {"name": "jdist.models.mlp:inti"}}, "jdist.models.mlp has no attribute 'inti'; did you mean "
                                                    "'jdist.models.mlp:init'?"),
    ({"data": {"name": "txt"}}, "Unknown data.name: 'txt'. It needs to be one of ['digits', 'linear_regression', "
                                "'text'] or an import path 'package.module:function'; did you mean 'text'?"),
    ({"loss": {"name": "optax:l2_loss", "foo": 1}}, "Unknown key in [loss]: 'foo'"),
    ({"optimizer": {"name": "adamw", "weight_decay": -0.1}}, "optimizer.weight_decay must be >= 0, got -0.1"),
    # options another choice would ignore: the run would silently train something else than written
    ({"optimizer": {"momentum": 0.5}}, "'momentum' is an argument of optax.adafactor, optax.sgd, optax.sm3, not of "
                                       "optax.adam: change optimizer.name, or drop it (CLI: --unset "
                                       "optimizer.momentum)."),
    ({"optimizer": {"name": "sgd", "weight_decay": 0.1}}, "'weight_decay' is an argument of"),
    ({"model": {"name": "linear", "hidden": [512]}}, "Unknown key in [model]: 'hidden'. Valid keys: name. Drop it "
                                                     "(CLI: --unset model.hidden)."),
])
def test_config_errors(bad, match):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.from_dict(bad)
  assert match in str(err.value)


@pytest.mark.parametrize("override,match", [
    # `False` is not TOML: it arrives as the string 'False', which must not switch fallback on
    ("checkpoint.fallback=False", "checkpoint.fallback must be true or false (lowercase, as TOML writes them), "
                                  "got 'False'"),
    ("checkpoint.enabled=0", "checkpoint.enabled must be true or false"),
    ("checkpoint.every_seconds=abc", "checkpoint.every_seconds must be a number, got 'abc'"),
    ("checkpoint.every_seconds=-5", "checkpoint.every_seconds must be >= 0 (0: off), got -5.0"),
    ("optimizer.lr=true", "optimizer.lr must be a number or a schedule table (name = ...), got True"),
    ("data.seed=-1", "data.seed must be an int >= 0, got -1"),
    ("train.seed=1.5", "train.seed must be an integer, got 1.5"),
    ("run_dir=5", "run_dir must be a string"),
    ("strategy=foo", "[strategy] must be a table of keys, got 'foo'"),
    ("strategy.name=5", "strategy.name must be a string"),
])
def test_config_values_of_the_wrong_type_are_errors(override, match):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.load(None, [override])
  assert match in str(err.value)


@pytest.mark.parametrize("options,match", [
    ({"name": "local_sgd", "outer_lr": 0}, "strategy.outer_lr must be a number > 0"),
    ({"name": "local_sgd", "outer_lr": 0.7, "outer_momentum": "x"},
     "strategy.outer_momentum must be a number in [0, 1)"),
    ({"name": "sharded", "rules": "tp "}, 'strategy.rules must be "tp" (the model\'s tensor-parallel rules) or a list'),
    ({"name": "local_sgd", "outer_momentum": 0.9, "outer_nesterov": True},
     "strategy.outer_momentum = 0.9 and strategy.outer_nesterov = true configure the outer optimizer, which needs "
     "strategy.outer_lr"),
    ({"name": "local_sgd", "outer_lr": 0.7, "outer_nesterov": True},
     "outer_nesterov = true needs strategy.outer_momentum"),
    ({"name": "sharded", "fsdp_min_size": 4096}, "applies with strategy.fsdp_axis"),
    ({"name": "local_sgd", "outer_nesterov": True}, "strategy.outer_nesterov = true configures the outer optimizer"),
    # the reducer table: the failing key, a suggestion, and where the options of before reducers went
    ({"name": "data_parallel", "reducer": {"name": "powersgd", "rnak": 4}},
     "Unknown key 'rnak' in [strategy.reducer] for name = 'powersgd'. Valid keys: name, rank, stacked, algorithm, "
     "bucket_bytes. Did you mean 'rank'?"),
    ({"name": "data_parallel", "reducer": {"name": "int8", "algorithm": "ring"}},
     "Unknown key 'algorithm' in [strategy.reducer] for name = 'int8'. Valid keys: name; 'algorithm' is for name = "
     "'mean' or 'bf16' or 'powersgd'."),
    ({"name": "data_parallel", "reducer": "powersdg"},
     "Unknown strategy.reducer.name 'powersdg'. It needs to be one of ['mean', 'bf16', 'int8', 'powersgd']; did you "
     "mean 'powersgd'?"),
    ({"name": "data_parallel", "reducer": {"name": "powersgd", "rank": 0}}, "strategy.reducer.rank must be a positive "
                                                                            "int, got 0."),
    ({"name": "data_parallel", "reducer": {"algorithm": "rign"}},
     "strategy.reducer.algorithm must be one of ['halving_doubling', 'hierarchical', 'psum', 'ring', 'tree'], got "
     "'rign'. Did you mean 'ring'?"),
    ({"name": "data_parallel", "compression": "int8"}, "Option 'compression' of strategy 'data_parallel' is now "
                                                       "strategy.reducer.name"),
    ({"name": "local_sgd", "reducer": {"algorithm": "hierarchical"}},
     "strategy 'local_sgd': axis must be two mesh axes (outer, inner) for algorithm='hierarchical', got 'data'."),
])
def test_strategy_options_are_checked(options, match):
  from jdist import experiment
  with pytest.raises(config_lib.ConfigError) as err:
    experiment.build(config_lib.from_dict({"strategy": options, "train": {"steps": 1}}))
  assert match in str(err.value)


def test_optional_numbers_are_type_checked_and_a_file_key_can_be_unset(tmp_path):
  for overrides, match in ((["optimizer.name=sgd", "optimizer.momentum=abc"], "must be a number, got 'abc'"),
                           (["optimizer.name=adamw", "optimizer.weight_decay=false"], "must be a number, got False")):
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(None, overrides)
  cfg = config_lib.load(None, ["optimizer.name=adamw", "optimizer.weight_decay=1"])
  assert cfg.optimizer.kwargs == {"weight_decay": 1, "learning_rate": config_lib.DEFAULT_LR}
  # lr is learning_rate's short name; both are an error
  assert config_lib.from_dict({"optimizer": {"learning_rate": 0.1}}).optimizer.kwargs == {"learning_rate": 0.1}
  with pytest.raises(config_lib.ConfigError, match="optimizer.lr and optimizer.learning_rate are the same argument"):
    config_lib.from_dict({"optimizer": {"learning_rate": 0.1, "lr": 0.2}})
  # the file sets model.hidden and optimizer.momentum; switching choices from the command line drops them
  path = tmp_path / "c.toml"
  path.write_text('[model]\nhidden = [16]\n[optimizer]\nname = "sgd"\nmomentum = 0.5\n')
  switch = ["model.name=linear", "data.name=linear_regression", "optimizer.name=adam"]
  with pytest.raises(config_lib.ConfigError, match="--unset model.hidden"):
    config_lib.load(path, switch)
  cfg = config_lib.load(path, switch, unset=["model.hidden", "optimizer.momentum"])
  assert cfg.model.name == "linear" and "momentum" not in cfg.optimizer.kwargs
  with pytest.raises(config_lib.ConfigError, match="does not set 'optimizer.lr', so there is nothing to remove"):
    config_lib.load(path, [], unset=["optimizer.lr"])


def test_cli_unset_drops_a_file_key(tmp_path, capsys):
  cfg = _write_config(tmp_path, "x")
  err = _cli_error(capsys, ["train", str(cfg), "--set", "optimizer.momentum=0.5"])
  assert "'momentum' is an argument of" in err and "--unset optimizer.momentum" in err
  err = _cli_error(capsys, ["train", str(cfg), "--unset", "optimizer.nope"])
  assert "does not set 'optimizer.nope'" in err


def test_bundled_model_values_are_checked_when_built():
  from jdist import experiment
  for overrides, match in ((["model.hidden=5"], "model.hidden must be a list of positive ints"),
                           (["model.name=resmlp", "model.hidden=[8, 16]"], "one equal width per residual layer"),
                           (["model.name=gpt", "data.name=text", "model.n_heads=3", "data.seq_len=64"],
                            r"d_model \(128\) must be divisible by n_heads \(3\)"),
                           (["model.name=linear"], "model.name = 'linear' cannot train on data.name = 'digits'")):
    with pytest.raises(config_lib.ConfigError, match=match):
      experiment.build(config_lib.load(None, overrides + ["train.steps=1"]))


def test_cli_wrong_type_override_is_exit_2(tmp_path, capsys):
  assert main(["train", str(_write_config(tmp_path, "x")), "--set", "checkpoint.fallback=False"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "checkpoint.fallback must be true or false" in err, err
  assert not (tmp_path / "x").exists()  # nothing ran


def test_config_overrides_parse_toml_values(tmp_path):
  cfg = config_lib.load(_write_config(tmp_path, "x"), ["optimizer.lr=0.1", "model.hidden=[8, 8]", "run_dir=elsewhere",
                                                       "strategy.accumulate_steps=2", "mesh.data=4", "mesh.model=2"])
  assert cfg.optimizer.kwargs == {"learning_rate": 0.1} and cfg.model.kwargs == {"hidden": [8, 8]}
  assert cfg.run_dir == "elsewhere"
  assert dict(cfg.strategy.options) == {"accumulate_steps": 2}
  assert dict(cfg.mesh.axes) == {"data": 4, "model": 2}
  # a path reaches into tables and lists, and the saved config reads back as the same config
  gpt = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs" / "gpt_data_parallel.toml"
  cfg = config_lib.load(gpt, ["optimizer.args.1.learning_rate.peak_value=1e-3", "optimizer.args.0.max_norm=0.5"])
  clip, adamw = cfg.optimizer.kwargs["args"]
  assert clip["max_norm"] == 0.5 and adamw["learning_rate"]["peak_value"] == 1e-3
  assert config_lib.from_dict(tomllib.loads(config_lib.dumps(config_lib.to_dict(cfg)))) == cfg
  with pytest.raises(config_lib.ConfigError, match="'2' is not an index of the list there"):
    config_lib.load(gpt, ["optimizer.args.2.max_norm=1"])


def test_example_configs_load():
  import optax

  from jdist import experiment
  from jdist.mesh import make_mesh
  from jdist.models import mlp
  for path in (pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.toml"):
    cfg = config_lib.load(path)
    if cfg.strategy.name in ("data_parallel", "local_sgd"):  # their reducer tables build (no training)
      devices = jax.devices()[:cfg.mesh.num_devices or None]
      strategy = experiment.build_strategy(cfg.strategy.name, mlp.loss, optax.sgd(0.1),
                                           make_mesh(**cfg.mesh.axes, devices=devices), dict(cfg.strategy.options))
      assert strategy.info["reducer"] == {"ring_allreduce": "ring", "local_sgd": "ring",
                                          "powersgd": "powersgd-r4"}.get(path.stem, "psum"), path.name


def test_a_reducer_option_can_be_set_from_the_command_line(tmp_path):
  path = tmp_path / "c.toml"
  path.write_text('[strategy]\nname = "data_parallel"\nreducer = "powersgd"\n')
  cfg = config_lib.load(path, ["strategy.reducer.rank=4", "strategy.reducer.algorithm=ring"])
  assert dict(cfg.strategy.options) == {"reducer": {"name": "powersgd", "rank": 4, "algorithm": "ring"}}
  cfg = config_lib.load(None, ["strategy.reducer.name=int8"])
  assert dict(cfg.strategy.options) == {"reducer": {"name": "int8"}}
  with pytest.raises(config_lib.ConfigError, match=r"Unknown key in \[optimizer\]: 'adam'"):
    config_lib.load(None, ["optimizer.adam.b1=0.8"])
  table = tmp_path / "t.toml"
  table.write_text('[strategy.reducer]\nname = "powersgd"\nrank = 4\n')
  assert dict(config_lib.load(table, [], unset=["strategy.reducer.rank"]).strategy.options) == {
      "reducer": {"name": "powersgd"}}


def test_demo_prints_table_and_writes_png(tmp_path, capsys):
  assert main(["demo", "--steps", "30", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  from jdist.cli._demo import ENTRIES, _slug
  for entry in ENTRIES:
    assert entry.label in out
  assert "test acc" in out and "KB sent/dev/step" in out
  png = tmp_path / "loss_curves.png"
  assert png.stat().st_size > 20_000
  losses = {}
  for entry in ENTRIES:
    records = [r for r in __import__("jdist").train.read_jsonl(tmp_path / _slug(entry.label) / "metrics.jsonl")
               if "loss" in r]
    losses[entry.label] = (records[-1]["loss"], entry.exact, entry.model)
  for model in ("mlp", "resmlp"):  # within a model, every exact strategy computes the same mathematics
    exact = [loss for loss, is_exact, m in losses.values() if is_exact and m == model]
    assert len(exact) >= 3
    np.testing.assert_allclose(exact, exact[0], rtol=1e-4)


# `main`, then a second in which tensorstore's threads finish the reads still in flight when orbax's loop
# closed (each one used to print an "Event loop is closed" traceback, before or after our message).
LINGER = "import os, sys, time; from jdist.cli import main; rc = main(sys.argv[1:]); time.sleep(1); os._exit(rc)"


def test_cli_corrupted_checkpoint_is_one_line_in_a_real_process(tmp_path):
  cfg = _write_config(tmp_path, "corrupt")
  assert main(["train", str(cfg), "--quiet", "--set", "train.steps=10"]) == 0
  for f in (tmp_path / "corrupt" / "checkpoints" / "10" / "state" / "d").iterdir():
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  args = ["train", str(cfg), "--quiet", "--set", "train.steps=15"]
  for cmd in (_train_cmd(cfg)[:-2] + args, [sys.executable, "-c", LINGER] + args):  # the console script; lingering
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoints/10 cannot be read" in lines[0] and "fallback" in lines[0], done.stderr
  assert sorted(p.name for p in (tmp_path / "corrupt" / "checkpoints").iterdir()) == ["10", "5"]  # nothing lost


def test_bench_reports_a_benchmark_killed_by_a_signal(monkeypatch, capsys):
  from jdist.cli import _bench

  codes = iter([0, -9])  # the second benchmark dies of SIGKILL: a shell would say 137
  monkeypatch.setattr(_bench.subprocess, "call", lambda cmd, env: next(codes))
  assert _bench.bench(["allreduce", "pipeline"], quick=True) == 137


def test_version(capsys):
  import jdist
  with pytest.raises(SystemExit) as done:
    main(["--version"])
  assert done.value.code == 0
  assert capsys.readouterr().out.startswith(f"jdist {jdist.__version__} (jax {jax.__version__}, Python ")
