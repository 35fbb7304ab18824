"""``jdist launch -n P -- COMMAND``: P local processes joined by ``jax.distributed``, failing together.

Each process gets the environment ``jdist.distributed.initialize`` reads (a coordinator on a free
loopback port, its id, D emulated CPU devices). Output lines are prefixed with ``[p<i>]``. When one
process exits non-zero or dies, the others are stopped (SIGTERM to their whole process group, SIGKILL
after a grace period) and the launcher exits non-zero, naming the process that was lost. The launcher
is the last line of defence; inside the processes JAX's heartbeat already aborts the survivors of a
dead peer (see docs/multihost.md).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
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
                devices_per_process: int | None, timeout_s: float | None,
                heartbeat_timeout_s: int | None) -> dict[str, str]:
  """The environment of process ``process_id``: ``base`` plus the ``JDIST_*`` settings."""
  env = dict(base)
  env.update({distributed.ENV_COORDINATOR: coordinator, distributed.ENV_NUM_PROCESSES: str(num_processes),
              distributed.ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1"})
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
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int | None = None,
           timeout_s: float | None = None, heartbeat_timeout_s: int | None = None, grace_s: float = 5.0,
           port: int | None = None, out: IO[str] | None = None) -> int:
  """Runs ``command`` as ``num_processes`` local processes of one ``jax.distributed`` run.

  Args:
    command: the program and its arguments, e.g. ``["jdist", "train", "cfg.toml"]`` (``jdist`` runs with
      this Python) or ``["python", "script.py"]``; it must call ``jdist.distributed.initialize()``
      (``jdist train`` does) before JAX computes anything.
    num_processes: P, the number of processes (>= 1).
    devices_per_process: CPU devices each process emulates (``JDIST_LOCAL_DEVICES``); None: JAX's default.
    timeout_s: start-up timeout of each process (``JDIST_INIT_TIMEOUT``; None: 60 s).
    heartbeat_timeout_s: JAX's heartbeat timeout in each process (``JDIST_HEARTBEAT_TIMEOUT``; None: 30 s).
    grace_s: after a failure, seconds between SIGTERM and SIGKILL of the others.
    port: the coordinator port on 127.0.0.1 (None: a free one).
    out: where the prefixed output goes (default stdout).

  Returns:
    0 when every process exited with 0; else the exit code of the first process that failed (128 + the
    signal number when it was killed by a signal), or 130 when the launcher was interrupted.

  Raises:
    ValueError: an empty command or a bad count.
  """
  command = _resolve(command)
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
  coordinator = f"127.0.0.1:{port or free_port()}"
  group = _Group(out or sys.stdout)
  group.say(f"jdist launch: {num_processes} process(es)"
            + (f" x {devices_per_process} device(s)" if devices_per_process else "")
            + f", coordinator {coordinator}: {shlex.join(command)}")

  def on_term(signum, frame):  # a SIGTERM to the launcher stops the processes too
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
  try:
    for i in range(num_processes):
      try:
        group.start(command, process_env(dict(os.environ), coordinator=coordinator, num_processes=num_processes,
                                            process_id=i, devices_per_process=devices_per_process,
                                            timeout_s=timeout_s, heartbeat_timeout_s=heartbeat_timeout_s))
      except OSError as e:
        group.stop(grace_s)
        raise ValueError(f"cannot start {command[0]!r}: {e.strerror or e}.") from None
    group.pump_output()
    while True:
      codes = [p.poll() for p in group.procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        others = [j for j, c in enumerate(codes) if c is None]
        group.say(f"jdist launch: process {i} (pid {group.procs[i].pid}) {_describe(code)}; stopping "
                  f"{'the other processes ' + str(others) if others else 'the run'}.")
        group.stop(grace_s)
        group.drain()
        ends = ", ".join(f"process {j} {_describe(p.returncode) if p.returncode is not None else 'is still running'}"
                         for j, p in enumerate(group.procs) if j != i)
        group.say(f"jdist launch: error: lost process {i}, which {_describe(code)}"
                  + (f" ({ends})" if ends else "") + f". Its output above, prefixed [p{i}], shows why.")
        return code if code > 0 else 128 + (-code)
      if all(c == 0 for c in codes):
        group.drain()
        return 0
      time.sleep(POLL_S)
  except KeyboardInterrupt:
    group.stop(grace_s)  # first: saying so may itself fail
    group.say("jdist launch: interrupted; every process was stopped.")
    group.drain()
    return 130
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
