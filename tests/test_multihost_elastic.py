"""Runs that survive losing a process: ``jdist launch --max-restarts K [--min-processes M]`` (localhost, bounded).

Fault injection on the elastic run of tests/_multihost_worker.py (FSDP through ``jdist.fit``, 2 processes x 4
devices, a checkpoint every 2 steps): SIGKILL of a random process at 3 random moments (a seeded RNG) must end
with parameters bit for bit those of an uninterrupted run; a kill inside a checkpoint save leaves the previous
checkpoint to resume from; a slot that is lost for good is dropped and the run ends on the other. The restart
policy itself is tested on small scripts that start in milliseconds.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from jdist.cli._launch import checkpoint_dir_of, launch, newest_checkpoint
from tests import _multihost_worker as worker
from tests.test_multihost import _alive, _descendants, _launch_cmd, _Lines

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_multihost_worker.py")
SEED = 24  # the fault-injection schedule: which process, after which step, how long after it
PAUSE_S = 0.1  # each step of the elastic run sleeps this long (in every process): room for a kill mid-run


def _elastic_cmd(out, *worker_args, n=2, extra=()):
  return _launch_cmd(sys.executable, WORKER, "elastic", str(out), *map(str, worker_args), n=n,
                     extra=("--grace", "1", "--checkpoint-dir", str(out / "ckpt"), *extra))


def _params(record):
  return [record[f"params/{i}"] for i in range(sum(1 for k in record if k.startswith("params/")))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The elastic run on 2 processes x 4 devices, nothing killed: the reference of the restarted runs."""
  out = tmp_path_factory.mktemp("uninterrupted")
  done = subprocess.run(_elastic_cmd(out), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  record = dict(np.load(out / "attempt-0.npz"))
  assert (int(record["start_step"]), int(record["processes"]), len(record["losses"])) == (0, 2, worker.ELASTIC_STEPS)
  return record


def _process(launcher, process_id, restart):
  """The process with this id in the attempt after ``restart`` restarts (by the environment the launcher gave it)."""
  for p in _descendants(launcher.pid):
    try:
      env = p.environ()
    except psutil.Error:
      continue
    if env.get("JDIST_PROCESS_ID") == str(process_id) and env.get("JDIST_RESTART_COUNT") == str(restart):
      return p
  raise AssertionError(f"no process {process_id} of attempt {restart} under the launcher")


def _fault_schedule(seed):
  """Three kills: (process, step after whose line it dies, delay in s). The steps increase, so each comes after
  the checkpoint the attempt before it resumes from (at most the previous kill's step)."""
  rng = np.random.default_rng(seed)
  steps = np.sort(rng.choice(np.arange(2, worker.ELASTIC_STEPS - 1), size=3, replace=False))
  return [(int(rng.integers(2)), int(s), float(rng.uniform(0.0, 0.3))) for s in steps]


def _restart_lines(output):
  return [line for line in output.splitlines() if line.startswith("jdist launch: restart ")]


def _resumed_step(line):
  """The checkpoint step a restart line says the run resumes from (0 when there was none yet)."""
  if "no checkpoint in" in line:
    return 0
  return int(line.split("resuming from checkpoint step ")[1].split()[0])


@pytest.mark.slow
def test_three_random_sigkills_end_bit_identical_to_an_uninterrupted_run(uninterrupted, tmp_path):
  schedule = _fault_schedule(SEED)
  launcher = subprocess.Popen(_elastic_cmd(tmp_path, PAUSE_S, extra=("--max-restarts", "3")), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    lines = _Lines(launcher)
    for restart, (victim, step, delay) in enumerate(schedule):
      if restart:  # the next attempt's lines come after the launcher says it restarted
        lines.wait_for(lambda line, r=restart: line.startswith(f"jdist launch: restart {r}/3"), timeout=120)
      lines.wait_for(lambda line, v=victim, s=step: line.startswith(f"[p{v}] step {s} "), timeout=180)
      time.sleep(delay)
      _process(launcher, victim, restart).send_signal(signal.SIGKILL)
    launcher.wait(timeout=300)
    output = lines.rest(timeout=5)
    children = _descendants(launcher.pid)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode == 0, output[-4000:]
  restarts = _restart_lines(output)
  assert len(restarts) == 3, output[-4000:]
  for restart, ((victim, step, _), line) in enumerate(zip(schedule, restarts), 1):
    assert line.startswith(f"jdist launch: restart {restart}/3: process {victim} (slot {victim}, pid "), line
    assert "was killed by signal SIGKILL; starting 2 process(es) x 4 device(s);" in line, line
    resumed = _resumed_step(line)
    assert resumed % worker.ELASTIC_EVERY == 0 and resumed <= step + 1, (line, step)
  assert "jdist launch: finished after 3 restart(s), on 2 process(es) x 4 device(s)." in output
  last = dict(np.load(tmp_path / "attempt-3.npz"))
  start = int(last["start_step"])
  assert start == _resumed_step(restarts[-1])
  # bit for bit: the same devices, the same batches from the checkpoint's data position
  np.testing.assert_array_equal(last["losses"], uninterrupted["losses"][start:])
  for got, want in zip(_params(last), _params(uninterrupted), strict=True):
    np.testing.assert_array_equal(got, want)
  assert not _alive(children), f"orphans left: {_alive(children)}"


@pytest.mark.slow
def test_a_kill_inside_a_save_and_a_host_lost_for_good(uninterrupted, tmp_path):
  """Process 0 dies while committing the checkpoint of step 6 and its slot never starts again: the run resumes
  from step 4 on the other process alone (4 devices instead of 8, the same global batch, the data from the
  checkpoint's position), and ends equal to the uninterrupted run to fp32 rounding."""
  ckpt = tmp_path / "ckpt"
  launcher = subprocess.Popen(
      _elastic_cmd(tmp_path, PAUSE_S, 6, extra=("--max-restarts", "2", "--min-processes", "1", "--timeout", "60")),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    lines = _Lines(launcher)
    lines.wait_for(lambda line: line.startswith("[p0] committing checkpoint step 6"), timeout=180)
    (tmp_path / "lost-slot-0").touch()  # from now on slot 0's process exits at once: its host is gone
    _process(launcher, 0, 0).send_signal(signal.SIGKILL)
    time.sleep(0.2)
    # cut inside the save: step 6 is only a temporary directory, step 4 the newest checkpoint
    cut = sorted(p.name for p in ckpt.iterdir())
    launcher.wait(timeout=300)
    output = lines.rest(timeout=5)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert "6.orbax-checkpoint-tmp" in cut and "6" not in cut and "4" in cut, cut
  assert launcher.returncode == 0, output[-4000:]
  first, second = _restart_lines(output)
  assert first.startswith("jdist launch: restart 1/2: process 0 (slot 0, pid ") and (
      "was killed by signal SIGKILL; starting 2 process(es) x 4 device(s); resuming from checkpoint step 4 in") in first
  assert second.startswith("jdist launch: restart 2/2: process 0 (slot 0, pid ") and (
      "exited with code 1 before joining the run; slot(s) [0] dropped (never reached jdist.distributed.initialize); "
      "starting 1 process(es) x 4 device(s) (was 2); resuming from checkpoint step 4 in") in second, second
  assert "slot 0: this host is gone" in output
  last = dict(np.load(tmp_path / "attempt-2.npz"))
  assert (int(last["start_step"]), int(last["processes"]), int(last["devices"])) == (4, 1, 4)
  # the same global batches from step 5 on (the data position counts global batches), summed by 4 devices
  np.testing.assert_allclose(last["losses"], uninterrupted["losses"][4:], rtol=1e-5)
  for got, want in zip(_params(last), _params(uninterrupted), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # the run saved step 6 again (over the leftover) and went on: nothing temporary is left
  assert newest_checkpoint(ckpt) == worker.ELASTIC_STEPS
  assert not [p.name for p in ckpt.iterdir() if "tmp" in p.name], sorted(p.name for p in ckpt.iterdir())


# ------------------------------------------------------------------ the restart policy on small scripts

_SCRIPT = """
import os, pathlib, sys, time
slot, restart = os.environ["JDIST_SLOT"], int(os.environ["JDIST_RESTART_COUNT"])
print("slot", slot, "process", os.environ["JDIST_PROCESS_ID"], "of", os.environ["JDIST_NUM_PROCESSES"], "restart",
      restart, "of", os.environ["JDIST_MAX_RESTARTS"], flush=True)
if slot in sys.argv[1].split(","):  # a lost host: fails before it arrives
  sys.exit(4)
# what jdist.distributed.initialize does under the launcher (without importing JAX: this test stays fast)
pathlib.Path(os.environ["JDIST_LAUNCH_DIR"], "arrived-" + os.environ["JDIST_PROCESS_ID"]).touch()
time.sleep(0.3)
sys.exit(int(sys.argv[2]) if restart < int(sys.argv[3]) else 0)
"""


def _launch_script(tmp_path, lost, code, fail_until, n=2, extra=()):
  """``jdist launch`` of _SCRIPT (in a process of its own: this one runs JAX's threads, which a fork must not
  copy): slots in ``lost`` exit 4 before arriving; the others exit ``code`` while the restart count is below
  ``fail_until``, then 0. Returns (exit code, the launcher's lines)."""
  cmd = [sys.executable, "-m", "jdist.cli", "launch", "-n", str(n), "--grace", "1", "--timeout", "20", *map(str, extra),
         "--", sys.executable, "-c", _SCRIPT, lost, str(code), str(fail_until)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  return done.returncode, done.stdout.splitlines()


def test_restarts_the_whole_group_until_it_succeeds(tmp_path):
  code, lines = _launch_script(tmp_path, "", 3, 2, extra=("--max-restarts", 2, "--checkpoint-dir", tmp_path / "none"))
  assert code == 0, lines
  restarts = [line for line in lines if line.startswith("jdist launch: restart")]
  assert len(restarts) == 2 and restarts[0].startswith("jdist launch: restart 1/2: process ") and (
      "exited with code 3; starting 2 process(es); no checkpoint in " in restarts[0]), restarts
  assert lines[-1] == "jdist launch: finished after 2 restart(s), on 2 process(es)."
  # every attempt starts every slot, ids and slots alike, and tells it the restart count
  for restart in range(3):
    assert {f"[p{i}] slot {i} process {i} of 2 restart {restart} of 2" for i in range(2)} <= set(lines), lines


def test_no_restarts_left_is_the_last_failure(tmp_path):
  code, lines = _launch_script(tmp_path, "", 3, 5, extra=("--max-restarts", 1))
  assert code == 3
  assert sum(line.startswith("jdist launch: restart 1/1: ") for line in lines) == 1
  assert lines[-1].startswith("jdist launch: error: lost process ") and (
      "exited with code 3" in lines[-1] and "; no restarts left (--max-restarts 1)." in lines[-1]), lines[-1]


def test_a_slot_that_never_arrives_is_dropped_down_to_min_processes(tmp_path):
  (tmp_path / "ckpt" / "8").mkdir(parents=True)
  (tmp_path / "ckpt" / "10.orbax-checkpoint-tmp").mkdir()  # a save cut short is not a checkpoint
  code, lines = _launch_script(tmp_path, "1", 3, 0, n=3, extra=("--max-restarts", 2, "--min-processes", 2,
                                                             "--checkpoint-dir", tmp_path / "ckpt"))
  assert code == 0, lines
  restart = next(line for line in lines if line.startswith("jdist launch: restart"))
  assert restart.startswith("jdist launch: restart 1/2: process 1 (slot 1, pid ") and restart.endswith(
      "exited with code 4 before joining the run; slot(s) [1] dropped (never reached jdist.distributed.initialize); "
      f"starting 2 process(es) (was 3); resuming from checkpoint step 8 in {tmp_path / 'ckpt'} (the steps after it run "
      "again)."), restart
  assert lines[0].startswith("jdist launch: 3 process(es), coordinator 127.0.0.1:") and (
      ", up to 2 restart(s) (down to 2 process(es)): " in lines[0]), lines[0]
  # the slots left are renumbered: slot 2 is now process 1
  assert "[p1] slot 2 process 1 of 2 restart 1 of 2" in lines, lines


def test_too_few_slots_left_ends_the_run(tmp_path):
  code, lines = _launch_script(tmp_path, "0,1", 3, 0, n=3, extra=("--max-restarts", 2, "--min-processes", 2))
  assert code == 4, lines
  assert not any(line.startswith("jdist launch: restart") for line in lines)
  assert lines[-1].startswith("jdist launch: error: lost process 0, which exited with code 4") and lines[-1].endswith(
      "; only 1 process slot(s) left, fewer than --min-processes 2 (slot(s) [0, 1] never reached "
      "jdist.distributed.initialize). Its output above, prefixed [p0], shows why."), lines[-1]


def test_nobody_arriving_drops_nobody(tmp_path):
  # every process fails before arriving (a bad command, or one that never calls initialize): the hosts are not
  # to blame, so the group restarts whole
  code, lines = _launch_script(tmp_path, "0,1", 3, 0, extra=("--max-restarts", 1, "--min-processes", 1))
  assert code == 4
  restart = next(line for line in lines if line.startswith("jdist launch: restart"))
  assert "before joining the run; starting 2 process(es);" in restart, restart


def test_restart_options_are_checked_before_starting_anything(tmp_path):
  for kwargs, match in (({"max_restarts": -1}, "--max-restarts must be an int >= 0, got -1"),
                        ({"min_processes": 3},
                         r"--min-processes must be an int from 1 to the number of processes \(2\)"),
                        ({"min_processes": 0}, "--min-processes must be an int from 1")):
    with pytest.raises(ValueError, match=match):
      launch([sys.executable, "-c", "pass"], num_processes=2, **kwargs)


def test_where_a_jdist_train_run_keeps_its_checkpoints(tmp_path):
  config = tmp_path / "c.toml"
  config.write_text('run_dir = "runs/x"\n[model]\nhidden = [8]\n')
  assert checkpoint_dir_of(["jdist", "train", str(config)]) == os.path.join("runs/x", "checkpoints")
  assert checkpoint_dir_of([sys.executable, "-m", "jdist.cli", "train", str(config), "--set", "run_dir=runs/y"]) == (
      os.path.join("runs/y", "checkpoints"))
  assert checkpoint_dir_of(["jdist", "train", str(config), "--set", "checkpoint.enabled=false"]) is None
  assert checkpoint_dir_of(["python", "train.py"]) is None
  assert checkpoint_dir_of(["jdist", "train", str(tmp_path / "missing.toml")]) is None
  assert newest_checkpoint(tmp_path / "missing") is None and newest_checkpoint(None) is None
