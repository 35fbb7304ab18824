"""``jdist launch -n P -- COMMAND``: P local processes joined by ``jax.distributed``, failing together, and
restarted together with ``--max-restarts``.

Each process gets the environment ``jdist.distributed.initialize`` reads (a coordinator on a free
loopback port, its id, D emulated CPU devices). Output lines are prefixed with ``[p<i>]``. When one
process exits non-zero or dies, the others are stopped (SIGTERM to their whole process group, SIGKILL
after a grace period). Without restarts the launcher then exits non-zero, naming the process that was
lost. With ``--max-restarts K`` it starts the group again, up to K times; the program resumes from its
last checkpoint (``jdist.fit`` does, resharded to the devices it finds). With ``--min-processes M`` < P a
slot whose process does not even reach ``jdist.distributed.initialize`` (a lost host) is dropped, and the
run goes on with fewer processes, down to M. Inside the processes JAX's heartbeat already aborts the
survivors of a dead peer (see docs/multihost.md).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Sequence

from jdist import distributed

POLL_S = 0.05


def free_port() -> int:
  """A TCP port on the loopback interface that is free right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int | None, timeout_s: float | None, heartbeat_timeout_s: int | None,
                slot: int | None = None, restart: int = 0, max_restarts: int = 0,
                launch_dir: str | None = None) -> dict[str, str]:
  """The environment of process ``process_id``: ``base`` plus the ``JDIST_*`` settings (``slot``: the
  launcher's slot it runs in, kept across restarts; ``restart``: how many restarts came before it)."""
  env = dict(base)
  env.update({distributed.ENV_COORDINATOR: coordinator, distributed.ENV_NUM_PROCESSES: str(num_processes),
              distributed.ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1",
              distributed.ENV_SLOT: str(process_id if slot is None else slot),
              distributed.ENV_RESTART_COUNT: str(restart), distributed.ENV_MAX_RESTARTS: str(max_restarts)})
  if launch_dir is not None:
    env[distributed.ENV_LAUNCH_DIR] = launch_dir
  if timeout_s is not None:
    env[distributed.ENV_INIT_TIMEOUT] = f"{timeout_s:g}"
  if heartbeat_timeout_s is not None:
    env[distributed.ENV_HEARTBEAT_TIMEOUT] = str(heartbeat_timeout_s)
  if devices_per_process is not None:
    env[distributed.ENV_LOCAL_DEVICES] = str(devices_per_process)
    # for programs that do not call jdist.distributed.initialize (it sets jax_num_cpu_devices itself)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def _resolve(command: Sequence[str]) -> list[str]:
  """``jdist ...`` runs with this interpreter (the same environment), whether or not a script is installed."""
  command = list(command)
  if command and command[0] == "jdist":
    return [sys.executable, "-m", "jdist.cli", *command[1:]]
  return command


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by signal {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with code {code}"


def _death_signal():
  """Linux: a function for the child (between fork and exec) that makes it get SIGKILL if the launcher
  itself dies (``PR_SET_PDEATHSIG``), so even a killed launcher takes the processes it started with it
  (not processes those start in turn); None elsewhere."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def newest_checkpoint(directory: str | os.PathLike | None) -> int | None:
  """The newest step saved in a ``jdist.fit`` checkpoint directory, or None (none, or no directory).

  orbax writes a step into ``STEP.orbax-checkpoint-tmp-*`` and renames it to ``STEP`` when complete, so
  only plain numbers count: a save cut short by a crash is not a checkpoint."""
  if directory is None:
    return None
  try:
    steps = [int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit() and p.is_dir()]
  except OSError:
    return None
  return max(steps, default=None)


def checkpoint_dir_of(command: Sequence[str]) -> str | None:
  """Where ``jdist train CONFIG [--set ...]`` keeps its checkpoints (``run_dir/checkpoints``), so that the
  launcher can say which step a restart resumes from; None for any other command or a config it cannot read."""
  command = list(command)
  if command[:1] == [sys.executable] and command[1:3] == ["-m", "jdist.cli"]:
    command = ["jdist", *command[3:]]
  if command[:2] != ["jdist", "train"]:
    return None
  from jdist import config as config_lib
  from jdist.cli import _parser

  try:
    args = _parser().parse_args(command[1:])
    cfg = config_lib.load(args.config, args.overrides, args.unset)
  except (SystemExit, Exception):  # noqa: BLE001 - the processes will report a bad config themselves
    return None
  return os.path.join(cfg.run_dir, "checkpoints") if cfg.checkpoint.enabled else None


class _Group:
  """The running processes, their output pumps, and how to stop them all."""

  def __init__(self, out: IO[str]):
    self.out = out
    self.lock = threading.Lock()
    self.procs: list[subprocess.Popen] = []
    self.pumps: list[threading.Thread] = []
    self.closed = False  # our reader went away (`jdist launch ... | head`)

  def say(self, text: str) -> None:
    with self.lock:
      if self.closed:
        return
      try:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()
      except (OSError, ValueError):
        # keep draining the processes' pipes (a full pipe would block them) but print nothing more;
        # on our own stdout, point it at /dev/null so that the flush at exit does not fail either
        self.closed = True
        if self.out is sys.stdout:
          os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

  def start(self, command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            start_new_session=True,  # its own process group: stopped as a whole, children included
                            preexec_fn=_death_signal())
    self.procs.append(proc)

  def pump_output(self) -> None:
    """One thread per process copies its output lines, prefixed (started after every fork, not between)."""
    for i, proc in enumerate(self.procs):
      pump = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
      pump.start()
      self.pumps.append(pump)

  def _pump(self, i: int, proc: subprocess.Popen) -> None:
    for raw in iter(proc.stdout.readline, b""):
      self.say(f"[p{i}] " + raw.decode(errors="replace").rstrip("\n"))

  def signal_all(self, sig: int) -> None:
    for proc in self.procs:
      try:
        os.killpg(proc.pid, sig)  # the group may outlive its leader: signal it even if the leader exited
      except (ProcessLookupError, PermissionError):
        pass

  def stop(self, grace_s: float) -> None:
    """SIGTERM to every group, SIGKILL to what is left after ``grace_s``; waits for the leaders."""
    self.signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
      time.sleep(POLL_S)
    self.signal_all(signal.SIGKILL)
    for p in self.procs:
      try:
        p.wait(timeout=max(1.0, grace_s))
      except subprocess.TimeoutExpired:
        pass

  def drain(self, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    for pump in self.pumps:
      pump.join(timeout=max(0.0, deadline - time.monotonic()))


@dataclasses.dataclass(frozen=True)
class Failure:
  """How one attempt of the group ended: which process failed first, how, and the slots found lost."""

  index: int  # process id in that attempt
  code: int  # its return code (negative: killed by that signal)
  pid: int
  arrived: bool  # whether it had reached jdist.distributed.initialize
  lost: tuple[int, ...]  # slots dropped: their process never arrived (only looked for when the run may shrink)
  ends: str  # how the other processes ended


def _first_failure(codes: list[int | None]) -> int | None:
  """The process to blame among those that failed: one that JAX did not abort for a peer's death (SIGABRT
  from the heartbeat) if there is one, so that a killed process is named rather than its survivor."""
  failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
  if not failed:
    return None
  return next((i for i in failed if codes[i] != -signal.SIGABRT), failed[0])


def _wait_for_arrivals(group: _Group, launch_dir: str, timeout_s: float) -> set[int]:
  """Waits until every process of the attempt arrived (``jdist.distributed.initialize``) or ended, at most
  ``timeout_s``; returns the ids of those that arrived."""
  deadline = time.monotonic() + timeout_s
  while True:
    arrived = {i for i in range(len(group.procs)) if os.path.exists(os.path.join(launch_dir, f"arrived-{i}"))}
    waiting = [i for i, p in enumerate(group.procs) if i not in arrived and p.poll() is None]
    if not waiting or time.monotonic() >= deadline:
      return arrived
    time.sleep(POLL_S)


def _supervise(group: _Group, slots: list[int], launch_dir: str, *, grace_s: float,
               shrink_wait_s: float | None) -> Failure | None:
  """Watches one attempt: None when every process exits with 0; else stops the group and returns the first
  failure. ``shrink_wait_s``: if the run may shrink, how long to wait for the others to arrive first."""
  while True:
    codes = [p.poll() for p in group.procs]
    i = _first_failure(codes)
    if i is None and all(c == 0 for c in codes):
      group.drain()
      return None
    if i is None:
      time.sleep(POLL_S)
      continue
    others = [j for j, c in enumerate(codes) if c is None]
    group.say(f"jdist launch: process {i} (pid {group.procs[i].pid}) {_describe(codes[i])}; stopping "
              f"{'the other processes ' + str(others) if others else 'the run'}.")
    lost: tuple[int, ...] = ()
    if shrink_wait_s is not None:
      arrived = _wait_for_arrivals(group, launch_dir, shrink_wait_s)
      if arrived:  # nobody arriving says nothing about the hosts (a bad command, a program without initialize)
        lost = tuple(slots[j] for j in range(len(slots)) if j not in arrived)
    else:
      arrived = {j for j in range(len(slots)) if os.path.exists(os.path.join(launch_dir, f"arrived-{j}"))}
    group.stop(grace_s)
    group.drain()
    ends = ", ".join(f"process {j} {_describe(p.returncode) if p.returncode is not None else 'is still running'}"
                     for j, p in enumerate(group.procs) if j != i)
    return Failure(index=i, code=codes[i], pid=group.procs[i].pid, arrived=i in arrived, lost=lost, ends=ends)


def _exit_code(code: int) -> int:
  return code if code > 0 else 128 + (-code)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the launcher runs: the command, the process layout and the restart policy, checked."""

  command: list[str]
  num_processes: int
  devices_per_process: int | None
  timeout_s: float | None
  heartbeat_timeout_s: int | None
  grace_s: float
  port: int | None
  max_restarts: int
  min_processes: int
  checkpoint_dir: str | None

  def env(self, slots: list[int], process_id: int, coordinator: str, restart: int, launch_dir: str) -> dict:
    return process_env(dict(os.environ), coordinator=coordinator, num_processes=len(slots), process_id=process_id,
                       devices_per_process=self.devices_per_process, timeout_s=self.timeout_s,
                       heartbeat_timeout_s=self.heartbeat_timeout_s, slot=slots[process_id], restart=restart,
                       max_restarts=self.max_restarts, launch_dir=launch_dir)

  def resumes_from(self) -> str:
    if self.checkpoint_dir is None:
      return "the program resumes from its last checkpoint (pass --checkpoint-dir to log its step)"
    step = newest_checkpoint(self.checkpoint_dir)
    if step is None:
      return f"no checkpoint in {self.checkpoint_dir} yet: the run starts again from step 0"
    return f"resuming from checkpoint step {step} in {self.checkpoint_dir} (the steps after it run again)"

  def devices(self, n: int) -> str:
    return f"{n} process(es)" + (f" x {self.devices_per_process} device(s)" if self.devices_per_process else "")


def _check(command, num_processes, devices_per_process, timeout_s, heartbeat_timeout_s, grace_s, max_restarts,
           min_processes) -> None:
  if not command:
    raise ValueError("jdist launch needs a command after --, e.g. jdist launch -n 2 -- jdist train config.toml.")
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"the number of processes must be a positive int, got {num_processes!r}.")
  if devices_per_process is not None and (not isinstance(devices_per_process, int) or devices_per_process < 1):
    raise ValueError(f"--devices-per-process must be a positive int, got {devices_per_process!r}.")
  if not grace_s >= 0:
    raise ValueError(f"the grace period must be >= 0 seconds, got {grace_s!r}.")
  if timeout_s is not None and not timeout_s > 0:
    raise ValueError(f"--timeout must be a number of seconds > 0, got {timeout_s!r}.")
  if heartbeat_timeout_s is not None and not heartbeat_timeout_s >= 1:
    raise ValueError(f"--heartbeat-timeout must be a number of seconds >= 1, got {heartbeat_timeout_s!r}.")
  if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
    raise ValueError(f"--max-restarts must be an int >= 0, got {max_restarts!r}.")
  if min_processes is not None and (isinstance(min_processes, bool) or not isinstance(min_processes, int)
                                    or not 1 <= min_processes <= num_processes):
    raise ValueError(f"--min-processes must be an int from 1 to the number of processes ({num_processes}), got "
                     f"{min_processes!r}.")


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int | None = None,
           timeout_s: float | None = None, heartbeat_timeout_s: int | None = None, grace_s: float = 5.0,
           port: int | None = None, out: IO[str] | None = None, max_restarts: int = 0,
           min_processes: int | None = None, checkpoint_dir: str | os.PathLike | None = None) -> int:
  """Runs ``command`` as ``num_processes`` local processes of one ``jax.distributed`` run, restarting it on failure.

  When a process fails, every process is stopped; with restarts left the group starts again (new
  coordinator port, ``JDIST_RESTART_COUNT`` one higher) and the program resumes from its last checkpoint.
  If the run may shrink (``min_processes`` below the current count), the launcher first waits (up to the
  start-up timeout) for every process to reach ``jdist.distributed.initialize``; the slots whose process
  never did are dropped, and the run restarts with the rest, renumbered 0 .. P' - 1, each with the same
  devices (so the run has fewer devices: ``jdist.fit`` reshards the checkpoint onto them).

  Args:
    command: the program and its arguments, e.g. ``["jdist", "train", "cfg.toml"]`` (``jdist`` runs with
      this Python) or ``["python", "script.py"]``; it must call ``jdist.distributed.initialize()``
      (``jdist train`` does) before JAX computes anything.
    num_processes: P, the number of processes (>= 1).
    devices_per_process: CPU devices each process emulates (``JDIST_LOCAL_DEVICES``); None: JAX's default.
    timeout_s: start-up timeout of each process (``JDIST_INIT_TIMEOUT``; None: 60 s).
    heartbeat_timeout_s: JAX's heartbeat timeout in each process (``JDIST_HEARTBEAT_TIMEOUT``; None: 30 s).
    grace_s: after a failure, seconds between SIGTERM and SIGKILL of the others.
    port: the coordinator port on 127.0.0.1 (None: a free one, a new one for each restart).
    out: where the prefixed output goes (default stdout).
    max_restarts: K, how many times the group may be started again after a failure (0: never).
    min_processes: M, the fewest processes the run may go on with after losing slots (default P: never
      fewer). Needs restarts to have any effect.
    checkpoint_dir: the run's checkpoint directory, only to log the step each restart resumes from (for
      ``jdist train CONFIG`` it is read from the config).

  Returns:
    0 when every process of the last attempt exited with 0; else the exit code of the first process that
    failed in the last attempt (128 + the signal number when it was killed by a signal), or 130 when the
    launcher was interrupted.

  Raises:
    ValueError: an empty command or a bad count.
  """
  _check(command, num_processes, devices_per_process, timeout_s, heartbeat_timeout_s, grace_s, max_restarts,
         min_processes)
  if checkpoint_dir is None:
    checkpoint_dir = checkpoint_dir_of(command)
  plan = _Plan(command=_resolve(command), num_processes=num_processes, devices_per_process=devices_per_process,
               timeout_s=timeout_s, heartbeat_timeout_s=heartbeat_timeout_s, grace_s=grace_s, port=port,
               max_restarts=max_restarts, min_processes=min_processes or num_processes,
               checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir))
  out = out or sys.stdout

  def on_term(signum, frame):  # a SIGTERM to the launcher stops the processes too
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
  try:
    with tempfile.TemporaryDirectory(prefix="jdist-launch-") as launch_dir:
      return _run(plan, out, launch_dir)
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _start(group: _Group, plan: _Plan, slots: list[int], restart: int, launch_dir: str) -> None:
  """Starts one process per slot (a new coordinator port each time: the last one may linger in TIME_WAIT)."""
  coordinator = f"127.0.0.1:{plan.port or free_port()}"
  group.procs, group.pumps = [], []
  if restart == 0:
    policy = ""
    if plan.max_restarts:
      policy = f", up to {plan.max_restarts} restart(s)" + (
          f" (down to {plan.min_processes} process(es))" if plan.min_processes < len(slots) else "")
    group.say(f"jdist launch: {plan.devices(len(slots))}, coordinator {coordinator}{policy}: "
              f"{shlex.join(plan.command)}")
  for i in range(len(slots)):
    try:
      group.start(plan.command, plan.env(slots, i, coordinator, restart, launch_dir))
    except OSError as e:
      group.stop(plan.grace_s)
      raise ValueError(f"cannot start {plan.command[0]!r}: {e.strerror or e}.") from None
  group.pump_output()


def _run(plan: _Plan, out: IO[str], launch_dir: str) -> int:
  """The attempts, until one succeeds, the restarts run out or too few slots are left."""
  group = _Group(out)
  slots, restart = list(range(plan.num_processes)), 0
  try:
    while True:
      attempt_dir = os.path.join(launch_dir, f"attempt-{restart}")
      os.mkdir(attempt_dir)
      _start(group, plan, slots, restart, attempt_dir)
      may_shrink = restart < plan.max_restarts and len(slots) > plan.min_processes
      failure = _supervise(group, slots, attempt_dir, grace_s=plan.grace_s, shrink_wait_s=(
          (plan.timeout_s or distributed.DEFAULT_TIMEOUT_S) if may_shrink else None))
      if failure is None:
        if restart:
          group.say(f"jdist launch: finished after {restart} restart(s), on {plan.devices(len(slots))}.")
        return 0
      left = [s for s in slots if s not in failure.lost]
      if restart >= plan.max_restarts or len(left) < plan.min_processes:
        _say_lost(group, plan, failure, restart, left)
        return _exit_code(failure.code)
      restart += 1
      _say_restart(group, plan, failure, restart, slots, left)
      slots = left
  except KeyboardInterrupt:
    group.stop(plan.grace_s)  # first: saying so may itself fail
    group.say("jdist launch: interrupted; every process was stopped.")
    group.drain()
    return 130


def _say_lost(group: _Group, plan: _Plan, failure: Failure, restart: int, left: list[int]) -> None:
  i = failure.index
  why = ""
  if plan.max_restarts and restart >= plan.max_restarts:
    why = f"; no restarts left (--max-restarts {plan.max_restarts})"
  elif plan.max_restarts:
    why = (f"; only {len(left)} process slot(s) left, fewer than --min-processes {plan.min_processes} (slot(s) "
           f"{list(failure.lost)} never reached jdist.distributed.initialize)")
  group.say(f"jdist launch: error: lost process {i}, which {_describe(failure.code)}"
            + (f" ({failure.ends})" if failure.ends else "") + why
            + f". Its output above, prefixed [p{i}], shows why.")


def _say_restart(group: _Group, plan: _Plan, failure: Failure, restart: int, slots: list[int],
                 left: list[int]) -> None:
  """One line per restart: the cause (process, slot, how it ended), what runs next, where it resumes."""
  cause = (f"process {failure.index} (slot {slots[failure.index]}, pid {failure.pid}) {_describe(failure.code)}"
           + ("" if failure.arrived else " before joining the run"))
  dropped = (f"slot(s) {list(failure.lost)} dropped (never reached jdist.distributed.initialize); "
             if failure.lost else "")
  shrink = f" (was {len(slots)})" if len(left) < len(slots) else ""
  group.say(f"jdist launch: restart {restart}/{plan.max_restarts}: {cause}; {dropped}starting "
            f"{plan.devices(len(left))}{shrink}; {plan.resumes_from()}.")
