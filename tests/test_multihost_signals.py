"""SIGTERM in a 2-process run (2 x 4 emulated CPU devices, gloo over loopback), sent to one process only: both
finish the same step, save it together (JAX's preemption sync point) and exit 143; the run resumes on 1 process x 8
devices and ends where an uninterrupted run does."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import jax
import pytest

from jdist import config as config_lib
from jdist.cli import main
from jdist.cli._launch import free_port, process_env
from jdist.experiment import build
from jdist.train import CheckpointConfig, Checkpointer
from tests.conftest import assert_trees_all_close

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="the 1-process resume needs 8 devices")

CONFIG = """
run_dir = "{run_dir}"
[model]
hidden = [32]
[data]
batch_size = 64
[strategy]
name = "data_parallel"
[mesh]
data = -1
cpu_devices = 4
[train]
steps = {steps}
log_every = 1
eval_every = 1000
progress = false
[checkpoint]
every_steps = 1000
"""


def _state(config_path, overrides=()):
  cfg = config_lib.load(config_path, overrides)
  ckpt = Checkpointer(CheckpointConfig(directory=pathlib.Path(cfg.run_dir) / "checkpoints"))
  step, state, _ = ckpt.restore_latest(build(cfg).state)
  ckpt.close()
  return step, jax.device_get(state.params)


def test_sigterm_to_one_process_saves_the_same_step_in_both(tmp_path, capsys):
  config = tmp_path / "run.toml"
  config.write_text(CONFIG.format(run_dir=tmp_path / "run", steps=2000))
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(2):
    env = process_env(dict(os.environ), coordinator=coordinator, num_processes=2, process_id=i, devices_per_process=4,
                      timeout_s=120, heartbeat_timeout_s=30)
    procs.append(subprocess.Popen([sys.executable, "-m", "jdist.cli", "train", str(config)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
  watchdog = threading.Timer(300, lambda: [os.killpg(p.pid, signal.SIGKILL) for p in procs if p.poll() is None])
  watchdog.start()
  try:
    for line in procs[0].stdout:  # process 0 prints the steps
      if line.startswith("step") and int(line.split()[1]) >= 5:
        procs[1].send_signal(signal.SIGTERM)  # a preemption notice to one host only
        break
    outputs = [p.communicate(timeout=240) for p in procs]
  finally:
    watchdog.cancel()
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outputs]
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 1 and saved[0] >= 5, saved  # one step, saved by both processes together
  stop = saved[0]
  assert f"SIGTERM: finished step {stop} and saved it" in outputs[0][1]
  event = json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[-1])
  assert event == {**event, "event": "interrupted", "signal": "SIGTERM", "step": stop}

  # resume on 1 process x 8 devices (cpu_devices may change on a resume) and compare with an uninterrupted run
  more = [f"train.steps={stop + 5}", "mesh.cpu_devices=8"]
  assert main(["train", str(config), "--quiet", *(f"--set={o}" for o in more)]) == 0
  assert f"resumed from step {stop}" in capsys.readouterr().out
  ref = tmp_path / "ref.toml"
  ref.write_text(CONFIG.format(run_dir=tmp_path / "ref", steps=stop + 5))
  assert main(["train", str(ref), "--quiet", "--set=mesh.cpu_devices=8"]) == 0
  step, params = _state(config, more)
  ref_step, ref_params = _state(ref, ["mesh.cpu_devices=8"])
  assert step == ref_step == stop + 5
  assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)  # 2 x 4 devices equal 1 x 8 to rounding
