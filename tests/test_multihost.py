"""Several processes on localhost as one JAX run (gloo over loopback), each with 4 emulated CPU devices.

2 processes x 4 devices must equal 1 process x 8 devices (the pytest process), for every strategy:
data_parallel, FSDP (GSPMD and shard_map), pipeline (data axis across the processes, pipe axis across them,
three schedules), local SGD, DiLoCo and async SGD (step by step and in one scan); data_parallel's pmap backend
must refuse to run across processes; each strategy's checkpoint written by 2 processes must resume on 1 and
on 4; a killed process must end the run, not hang it; a missing coordinator or process must be named within
the start-up timeout. Restarts and fault injection: tests/test_multihost_elastic.py.
"""
import functools
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import psutil
import pytest

import jdist
from jdist import distributed
from jdist.cli._launch import free_port, process_env
from jdist.errors import OptionError
from tests import _multihost_worker as worker
from tests.conftest import assert_trees_all_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_multihost_worker.py")
pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="the 1-process reference needs 8 devices")


def _launch_cmd(*command, n=2, devices=4, extra=()):
  return [sys.executable, "-m", "jdist.cli", "launch", "-n", str(n), "--devices-per-process", str(devices), *extra,
          "--", *command]


class _Lines:
  """Reads a process's output lines on a thread, so the test can wait for one with a timeout."""

  def __init__(self, proc):
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, args=(proc,), daemon=True).start()

  def _read(self, proc):
    for line in proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def _until(self, timeout):
    """The lines arriving within ``timeout`` seconds (recorded in ``self.lines``), until the output ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
      except queue.Empty:
        return
      if line is None:
        return
      self.lines.append(line)
      yield line

  def wait_for(self, predicate, timeout):
    for line in self._until(timeout):
      if predicate(line):
        return line
    raise AssertionError(f"no such line within {timeout} s; output:\n{''.join(self.lines[-40:])}")

  def rest(self, timeout):
    for _ in self._until(timeout):
      pass
    return "".join(self.lines)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """One `jdist launch -n 2 --devices-per-process 4` of the worker: every strategy of worker.CASES and fit."""
  out = tmp_path_factory.mktemp("two_processes")
  done = subprocess.run(_launch_cmd(sys.executable, WORKER, "train", str(out)), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "[p0] process 0 of 2 done, 8 devices" in done.stdout and "[p1] process 1 of 2 done" in done.stdout
  return out, dict(np.load(out / "result.npz"))


def _leaves(result, prefix):
  """The leaves the worker saved as ``prefix/0``, ``prefix/1``, ..., in order."""
  count = sum(1 for k in result if k.startswith(prefix + "/") and k.rsplit("/", 1)[1].isdigit())
  return [result[f"{prefix}/{i}"] for i in range(count)]


@functools.cache
def _strategy(name):
  """A case's strategy on 1 process x 8 devices, made once: the reference and the resume share its compiled step."""
  return worker.CASES[name].make()


@functools.cache
def _one_process(name):
  """``worker.run`` of a case on 1 process x 8 devices (this one)."""
  return worker.run(worker.CASES[name], worker.STEPS, strategy=_strategy(name))


@pytest.mark.parametrize("name", list(worker.CASES))
def test_two_processes_equal_one_process(two_process_run, name):
  _, result = two_process_run
  # scan_steps scans the same ticks as async_sgd's step: one reference serves both (saves a compile)
  params, losses = _one_process("async_sgd" if name == "async_sgd_run" else name)
  assert len(losses) == worker.STEPS
  np.testing.assert_allclose(result[f"{name}/losses"], losses, rtol=1e-5)
  assert_trees_all_close(_leaves(result, name), jax.tree.leaves(params), rtol=1e-5)


def test_unequal_shares_are_a_clear_error_not_a_skewed_average(two_process_run):
  # each process passes its share of the global batch: fit compares the shares (first batch, each change)
  _, result = two_process_run
  uneven, alone = str(result["error/uneven_shares"]), str(result["error/alone"])
  # "fit N": the N-th fit of this run (the cases before it ran through fit too)
  assert re.match(r"ValueError: The processes passed different numbers of examples at fit \d+, step 1 \(process 0: "
                  r"32, process 1: 16\)\. Every process must pass the same number", uneven), uneven
  assert "a loader that may end on a ragged batch must drop it in every process" in uneven
  # a process whose batch size changed alone (a ragged last batch) raises instead of waiting forever
  assert alone.startswith("ValueError: Process 0 passed 8 examples at a check only process 0 makes (a new batch "
                          "size, or its first batch), but process(es) [1] did not reach this check within 2 s"), alone


def test_pmap_backend_and_async_misuse_are_clear_errors_across_processes(two_process_run):
  _, result = two_process_run
  errors = {name: str(result[f"error/{name}"]) for name in ("pmap", "async_without_mesh", "async_all_workers")}
  # jax.pmap traced inside the jitted step maps over this process's devices only: it must not run
  assert errors["pmap"].startswith("OptionError: backend must be 'shard_map' across 2 processes, got 'pmap'."), \
      errors["pmap"]
  assert "Use backend='shard_map'" in errors["pmap"]
  assert errors["async_without_mesh"] == (
      "ValueError: async_sgd with mesh=None runs every worker on one device, jax.devices()[0], but this run has 2 "
      "processes and every process's devices must take part. Pass a mesh over all devices, e.g. "
      "mesh=jdist.make_mesh(workers=-1) (num_workers a multiple of its size).")
  assert errors["async_all_workers"].startswith(
      "BatchError: async_sgd: process 0's batch leaf ['x'] has axis 0 of size 8 (shape (8, 4, 16)), but in a run of "
      "2 processes each passes only the slices of its own 4 of the 8 workers"), errors["async_all_workers"]


def test_checkpoint_from_two_processes_resumes_on_one(two_process_run, tmp_path):
  out, _ = two_process_run
  steps = sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit())
  # process 1's clock said a time-based save was due at every step; process 0's (which decides) did not
  assert steps == [6, 9, worker.FIT_STEPS]  # saved at 3, 6, 9 and 12, not 10; the newest 3 kept
  # only process 0 wrote the metric log: one line per step, not two
  records = jdist.train.read_jsonl(out / "run" / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, worker.FIT_STEPS + 1))
  strategy = worker.fsdp_strategy()
  shutil.copytree(out / "ckpt", tmp_path / "ckpt")  # resume from a copy: the shared run stays as it was
  ckpt = jdist.CheckpointConfig(directory=tmp_path / "ckpt", every_steps=5)
  resumed = jdist.fit(strategy, strategy.init(worker.params()), worker.loader(), steps=worker.TOTAL_FIT_STEPS,
                      checkpoint=ckpt)
  assert resumed.start_step == worker.FIT_STEPS
  strategy = worker.fsdp_strategy()
  straight = jdist.fit(strategy, strategy.init(worker.params()), worker.loader(), steps=worker.TOTAL_FIT_STEPS)
  assert_trees_all_close(jax.device_get(resumed.state.params), jax.device_get(straight.state.params), rtol=1e-5)



@pytest.fixture(scope="module")
def four_process_resume(two_process_run, tmp_path_factory):
  """Every case's checkpoint written by 2 processes x 4 devices, resumed by 4 processes x 2 devices."""
  out, _ = two_process_run
  resumed = tmp_path_factory.mktemp("four_processes")
  shutil.copytree(out / "cases", resumed / "cases")  # resumes write nothing, but the shared run stays as it was
  done = subprocess.run(_launch_cmd(sys.executable, WORKER, "resume", str(resumed / "cases"), str(resumed), n=4,
                                    devices=2), capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  return dict(np.load(resumed / "resumed.npz"))


@pytest.mark.slow  # the 4-process run (its fixture): about a minute of 4 processes compiling on 2 cores
@pytest.mark.parametrize("name", [name for name, case in worker.CASES.items() if not case.scan])
def test_checkpoint_of_each_strategy_resumes_on_one_and_on_four_processes(two_process_run, four_process_resume,
                                                                          name, tmp_path):
  # the 2-process run went through fit and saved after step CKPT_STEP; resumed on 1 x 8 (here) and on 4 x 2, the
  # remaining steps must give the 2-process run's losses and final parameters
  out, result = two_process_run
  assert sorted(p.name for p in (out / "cases" / name).iterdir() if p.name.isdigit()) == [str(worker.CKPT_STEP)]
  shutil.copytree(out / "cases" / name, tmp_path / name)
  params, losses = worker.resume(worker.CASES[name], str(tmp_path / name), worker.STEPS, strategy=_strategy(name))
  rest = result[f"{name}/losses"][worker.CKPT_STEP:]
  assert len(losses) == worker.STEPS - worker.CKPT_STEP
  np.testing.assert_allclose(losses, rest, rtol=1e-5)
  assert_trees_all_close(jax.tree.leaves(params), _leaves(result, name), rtol=1e-5)
  if name in worker.FOUR_PROCESS_CASES:
    np.testing.assert_allclose(four_process_resume[f"{name}/losses"], rest, rtol=1e-5)
    assert_trees_all_close(_leaves(four_process_resume, name), _leaves(result, name), rtol=1e-5)


TRAIN_CONFIG = """
run_dir = "{run_dir}"
[model]
hidden = [32]
[data]
batch_size = 64
[strategy]
name = "data_parallel"
[train]
steps = 100000
log_every = 1
eval_every = 100000
progress = false
[checkpoint]
enabled = false
"""


def _step(line, prefix=None):
  """The step number of a PrintLogger line ("step   3  loss ..."), optionally after a [pN] prefix; else -1."""
  words = line.split()
  if prefix is not None:
    if words[:1] != [prefix]:
      return -1
    words = words[1:]
  return int(words[1]) if len(words) > 1 and words[0] == "step" and words[1].isdigit() else -1


def _descendants(pid):
  try:
    return psutil.Process(pid).children(recursive=True)
  except psutil.NoSuchProcess:
    return []


def _alive(procs):
  alive = []
  for p in procs:
    try:
      if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
        alive.append(p)
    except psutil.NoSuchProcess:
      pass
  return alive


def test_sigkill_mid_training_ends_the_run_and_names_the_lost_process(tmp_path):
  config = tmp_path / "spin.toml"
  config.write_text(TRAIN_CONFIG.format(run_dir=tmp_path / "run"))
  launcher = subprocess.Popen(_launch_cmd("jdist", "train", str(config), extra=("--grace", "3")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    lines = _Lines(launcher)
    lines.wait_for(lambda line: _step(line, "[p1]") >= 3, timeout=120)
    children = _descendants(launcher.pid)
    victim = next(p for p in children if p.environ().get("JDIST_PROCESS_ID") == "1")
    assert any(p.environ().get("JDIST_PROCESS_ID") == "0" for p in children)
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    launcher.wait(timeout=60)
    elapsed = time.monotonic() - killed_at
    output = lines.rest(timeout=5)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode != 0 and elapsed < 60
  assert "lost process 1, which was killed by signal SIGKILL" in output, output[-3000:]
  # the survivor was stopped, not left waiting (JAX's preemption service catches SIGTERM, so SIGKILL may end it)
  assert "process 0 was killed by signal SIGTERM" in output or "process 0 was killed by signal SIGKILL" in output
  time.sleep(0.5)
  assert not _alive(children), f"orphans left: {_alive(children)}"


def test_jax_heartbeat_ends_a_survivor_without_the_launcher(tmp_path):
  """No launcher: JAX's own heartbeat must abort process 0 when process 1 dies, naming task 1."""
  config = tmp_path / "spin.toml"
  config.write_text(TRAIN_CONFIG.format(run_dir=tmp_path / "run"))
  base = dict(os.environ)
  coordinator = f"127.0.0.1:{free_port()}"
  procs = []
  for i in range(2):
    env = process_env(base, coordinator=coordinator, num_processes=2, process_id=i, devices_per_process=4,
                      timeout_s=60, heartbeat_timeout_s=10)  # long enough for a stall on a busy machine
    procs.append(subprocess.Popen([sys.executable, "-m", "jdist.cli", "train", str(config)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
  try:
    survivor = _Lines(procs[0])
    survivor.wait_for(lambda line: _step(line) >= 3, timeout=120)
    procs[1].kill()
    killed_at = time.monotonic()
    procs[0].wait(timeout=60)
    elapsed = time.monotonic() - killed_at
    output = survivor.rest(timeout=5)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  assert procs[0].returncode != 0 and elapsed < 60
  assert "stopped sending heartbeats" in output and "\n1\n" in output, output[-3000:]


def test_coordinator_that_never_starts_is_a_clear_error_within_the_timeout():
  port = free_port()  # nobody listens there
  env = dict(os.environ, JDIST_COORDINATOR=f"127.0.0.1:{port}", JDIST_NUM_PROCESSES="2", JDIST_PROCESS_ID="1",
             JDIST_INIT_TIMEOUT="3")
  code = ("import time, jdist.distributed as d\nt = time.monotonic()\n"
          "try:\n  d.initialize()\nexcept d.DistributedError as e:\n  print(f'{time.monotonic() - t:.1f}', e)\n")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr[-2000:]
  seconds, message = done.stdout.split(" ", 1)
  assert 3 <= float(seconds) < 15  # the timeout is honoured; the upper bound leaves room for a busy machine
  assert f"process 1 of 2: no coordinator at 127.0.0.1:{port} after 3 s" in message
  assert "Process 0 runs the coordinator" in message


def _in_threads(fns):
  errors = [None] * len(fns)

  def call(i, fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - collected for the assertions
      errors[i] = e

  threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=30)
  return errors


def test_missing_process_is_named_by_every_process():
  address = f"127.0.0.1:{free_port()}"
  start = time.monotonic()
  errors = _in_threads([lambda: distributed._rendezvous(address, 3, 0, 2.0),
                        lambda: distributed._rendezvous(address, 3, 1, 2.0)])
  assert time.monotonic() - start < 15  # the 2 s timeout, with room for a busy machine
  assert all(isinstance(e, distributed.DistributedError) for e in errors), errors
  assert "process(es) [2] of 3 never arrived (arrived: [1])" in str(errors[0])
  assert "process 1 of 3: the coordinator at" in str(errors[1]) and "[2] never arrived" in str(errors[1])


def test_rendezvous_joins_and_rejects_a_wrong_process_count():
  address = f"127.0.0.1:{free_port()}"
  assert _in_threads([lambda i=i: distributed._rendezvous(address, 3, i, 10.0) for i in range(3)]) == [None] * 3
  address = f"127.0.0.1:{free_port()}"
  errors = _in_threads([lambda: distributed._rendezvous(address, 2, 0, 10.0),
                        lambda: distributed._rendezvous(address, 3, 1, 10.0)])
  assert all("process 1 was started for 3 processes but process 0 for 2" in str(e) for e in errors), errors


def test_what_counts_as_a_multi_process_environment(monkeypatch):
  for off in ("0", "false", "No", ""):
    monkeypatch.setenv(distributed.ENV_DISTRIBUTED, off)
    assert not distributed.requested(), off
  monkeypatch.setenv(distributed.ENV_DISTRIBUTED, "1")
  assert distributed.requested()
  from jax._src import clusters

  class OptIn(clusters.ClusterEnv):  # like mpi4py: "present" wherever the package imports
    opt_in_only_method = True

    @classmethod
    def is_env_present(cls):
      return True

  try:  # defining the subclass registered it with JAX's cluster detection
    assert not distributed._cluster_detected()
  finally:
    clusters.ClusterEnv._cluster_types.remove(OptIn)


def test_single_process_helpers_and_errors():
  assert distributed.process_count() == 1 and distributed.process_index() == 0 and distributed.is_coordinator()
  distributed.barrier("noop")
  distributed.check_batch_sizes(7, "one process: nothing to compare")
  with pytest.raises(RuntimeError, match="must run before JAX's first computation"):
    distributed.initialize("127.0.0.1:1234", 2, 0)
  distributed.initialize()  # one process, JAX started: nothing to do, as the docstring says
  distributed.initialize(num_processes=1)
  with pytest.raises(RuntimeError, match="must run before JAX's first computation"):  # a setting it can't apply now
    distributed.initialize(local_device_count=4)
  with pytest.raises(ValueError, match="process_id 2 is out of range for 2 processes"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="not of the form host:port"):
    distributed._split_address("localhost")
  # one process: the batch is global; the loader's shares are the global batch in order
  data = {"x": np.arange(32.0).reshape(16, 2)}
  full = next(iter(jdist.data.ArrayLoader(data, 8, seed=3, process_index=0, process_count=1)))
  shares = [next(iter(jdist.data.ArrayLoader(data, 8, seed=3, process_index=p, process_count=2))) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([s["x"] for s in shares]), full["x"])
  with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 processes"):
    jdist.data.ArrayLoader(data, 6, process_index=0, process_count=4)
  # async_sgd: the loader's share of each process is the slices of its own workers, in worker order
  workers = jdist.split_workers(full, 4)
  np.testing.assert_array_equal(
      np.concatenate([jdist.split_workers(s, 4, process_count=2)["x"] for s in shares]), workers["x"])
  assert workers["x"].shape == (4, 2, 2)
  with pytest.raises(OptionError) as caught:
    jdist.split_workers(full, 3, process_count=2)
  assert (caught.value.name, caught.value.got) == ("num_workers", 3)
  mesh = jdist.make_mesh(data=-1)
  start, stop, size = jdist.batches.process_batch_rows(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), 16)
  assert (start, stop, size) == (0, 16, 16)


def test_launcher_whose_output_is_closed_lets_the_processes_finish():
  # `jdist launch ... | head -2`: the launcher keeps draining the processes' pipes instead of hanging
  chatty = "for i in range(200000): print(i)"
  cmd = " ".join(_launch_cmd(sys.executable, "-c", repr(chatty))) + " | head -2"
  done = subprocess.run(["bash", "-c", cmd + "; exit ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines()[1] in ("[p0] 0", "[p1] 0") and done.stderr == ""


def test_launcher_propagates_a_failure_and_stops_the_others(tmp_path):
  # process 2 fails once the others have said they are up (each leaves a file), however slowly they start
  script = ("import os, pathlib, sys, time\ni = int(os.environ['JDIST_PROCESS_ID'])\nd = pathlib.Path(sys.argv[1])\n"
            "print('up', i, os.environ['JDIST_NUM_PROCESSES'], os.environ['JDIST_LOCAL_DEVICES'], flush=True)\n"
            "(d / f'up{i}').touch()\nend = time.monotonic() + 30\n"
            "while i == 2 and not all((d / f'up{j}').exists() for j in (0, 1)) and time.monotonic() < end:\n"
            "  time.sleep(0.05)\n"
            "time.sleep(0.2) if i == 2 else time.sleep(60)\nsys.exit(3)")
  done = subprocess.run(_launch_cmd(sys.executable, "-c", script, str(tmp_path), n=3, devices=2,
                                    extra=("--grace", "1")), capture_output=True, text=True, timeout=90)
  assert done.returncode == 3, done.stdout + done.stderr
  assert all(f"[p{i}] up {i} 3 2" in done.stdout for i in range(3)), done.stdout
  assert "lost process 2, which exited with code 3 (process 0 was killed by signal SIGTERM" in done.stdout, done.stdout


def test_launcher_refuses_bad_timeouts_before_starting_anything():
  from jdist.cli._launch import launch
  for kwargs, match in (({"timeout_s": -5}, "--timeout must be a number of seconds > 0, got -5"),
                        ({"heartbeat_timeout_s": 0}, "--heartbeat-timeout must be a number of seconds >= 1, got 0"),
                        ({"grace_s": -1}, "the grace period must be >= 0 seconds")):
    with pytest.raises(ValueError, match=match):
      launch([sys.executable, "-c", "pass"], num_processes=2, **kwargs)
