"""Several processes (hosts) as one JAX program, over ``jax.distributed``.

One JAX process runs per host (or per group of devices); ``initialize`` joins them through JAX's own
coordination service, after which ``jax.devices()`` lists the devices of every process and every
jdist strategy runs unchanged on a mesh that spans them. On CPU the cross-process collectives run over
gloo, so two processes on one machine are a real multi-host run (this is how the tests run).

Where the settings come from, first match wins:

1. the arguments of ``initialize``;
2. ``JDIST_COORDINATOR`` (``host:port`` of process 0), ``JDIST_NUM_PROCESSES``, ``JDIST_PROCESS_ID``,
   ``JDIST_LOCAL_DEVICES``, ``JDIST_INIT_TIMEOUT``, ``JDIST_HEARTBEAT_TIMEOUT``,
   ``JDIST_COLLECTIVE_TIMEOUT`` (set by ``jdist launch``, or by hand on each machine);
3. JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, ...).

What ends a run that lost a process, instead of a hang (see docs/multihost.md):

- start-up: before JAX's service starts, process 0 and the others meet on the coordinator port
  (``_rendezvous``); if the coordinator never answers, or some processes never arrive within
  ``timeout_s``, every process raises ``DistributedError`` naming the coordinator or the missing process
  ids. (JAX's own start-up timeout aborts the process with an unspecific ``DEADLINE_EXCEEDED``.)
- a process that dies: JAX's heartbeat (``heartbeat_timeout_s``). The coordination service notices
  that a process stopped sending heartbeats and aborts every survivor with "The following tasks are
  unhealthy (stopped sending heartbeats): <ids>"; when process 0 itself dies the others abort at once
  ("the leader task ... died").
- a process that is alive but stuck: XLA's CPU collective timeout (``collective_timeout_s``, flag
  ``--xla_cpu_collective_timeout_seconds``, XLA's default 30 min) raises a ``JaxRuntimeError`` in the
  waiting step.
- exit: ``shutdown_timeout_s`` bounds how long a finishing process waits for the others.
- ``jdist launch`` stops every process as soon as one fails (the last line of defence); with
  ``--max-restarts`` it starts them again and ``jdist.fit`` resumes from the last checkpoint
  (``restart_count`` tells a process how many restarts came before it).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax

ENV_COORDINATOR = "JDIST_COORDINATOR"
ENV_NUM_PROCESSES = "JDIST_NUM_PROCESSES"
ENV_PROCESS_ID = "JDIST_PROCESS_ID"
ENV_LOCAL_DEVICES = "JDIST_LOCAL_DEVICES"
ENV_INIT_TIMEOUT = "JDIST_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JDIST_HEARTBEAT_TIMEOUT"
ENV_COLLECTIVE_TIMEOUT = "JDIST_COLLECTIVE_TIMEOUT"
ENV_DISTRIBUTED = "JDIST_DISTRIBUTED"  # "1": let JAX detect the cluster (SLURM, Open MPI, TPU)
# set by `jdist launch` only: which of its process slots this is (kept across restarts, while process ids are
# renumbered), how many times it restarted the run so far and may at most, and where ``initialize`` records
# that this process arrived (a slot whose process never arrives is dropped when the run may shrink)
ENV_SLOT = "JDIST_SLOT"
ENV_RESTART_COUNT = "JDIST_RESTART_COUNT"
ENV_MAX_RESTARTS = "JDIST_MAX_RESTARTS"
ENV_LAUNCH_DIR = "JDIST_LAUNCH_DIR"
ENV_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_LOCAL_DEVICES, ENV_INIT_TIMEOUT,
            ENV_HEARTBEAT_TIMEOUT, ENV_COLLECTIVE_TIMEOUT, ENV_DISTRIBUTED)

DEFAULT_TIMEOUT_S = 60.0
FIRST_BATCH_TIMEOUT_S = 600.0  # fit's first batch-size check: processes may start their data far apart
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_SHUTDOWN_TIMEOUT_S = 60
CPU_COLLECTIVES = ("gloo", "mpi")
_HELLO = "jdist-hello"


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not be joined; the message names who is missing."""


def _detect_cluster_requested() -> bool:
  """``JDIST_DISTRIBUTED`` set to anything but an off value ("", "0", "false", "no", "off")."""
  return os.environ.get(ENV_DISTRIBUTED, "").strip().lower() not in ("", "0", "false", "no", "off")


def requested() -> bool:
  """Whether the environment asks for a multi-process run (``jdist launch`` or ``JDIST_*`` set by hand)."""
  return any(os.environ.get(v) for v in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)) or (
      _detect_cluster_requested())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: float | None = None,
    heartbeat_timeout_s: int | None = None,
    shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S,
    collective_timeout_s: int | None = None,
    cpu_collectives: str | None = "gloo",
) -> None:
  """Joins this process to a multi-process JAX run; call it first, before any JAX computation.

  A no-op apart from the device settings when there is one process (``num_processes == 1``, or nothing
  given and no cluster detected). Calling it again once initialised does nothing.

  Args:
    coordinator_address: ``host:port`` where process 0 runs the coordinator, reachable from every
      process (default ``$JDIST_COORDINATOR``, else detected by JAX).
    num_processes: how many processes take part (default ``$JDIST_NUM_PROCESSES``, else detected).
    process_id: this process's index in ``0 .. num_processes - 1`` (default ``$JDIST_PROCESS_ID``).
    local_device_count: CPU devices this process emulates (``jax_num_cpu_devices``; default
      ``$JDIST_LOCAL_DEVICES``; None leaves JAX's setting). No effect on GPU/TPU devices.
    timeout_s: start-up timeout in seconds: how long process 0 waits for the others to arrive and the
      others wait for the coordinator (default ``$JDIST_INIT_TIMEOUT`` or 60). Also JAX's
      ``initialization_timeout`` for what remains of the start-up.
    heartbeat_timeout_s: JAX's ``heartbeat_timeout_seconds``: a process silent for this long is declared
      dead and every survivor is aborted with a message naming it (default ``$JDIST_HEARTBEAT_TIMEOUT``
      or 30; JAX's own default is 100).
    shutdown_timeout_s: JAX's ``shutdown_timeout_seconds``: how long a finishing process waits for the
      others at exit.
    collective_timeout_s: if set, XLA's ``--xla_cpu_collective_timeout_seconds``: a CPU collective that
      waits longer fails with a ``JaxRuntimeError`` (default ``$JDIST_COLLECTIVE_TIMEOUT``, else XLA's 30
      minutes). Catches a peer that is alive but stuck, which heartbeats do not.
    cpu_collectives: ``"gloo"`` (default) or ``"mpi"``: how CPU devices of different processes talk;
      None leaves JAX's setting.

  Raises:
    DistributedError: the coordinator never answered, or some processes never arrived, within
      ``timeout_s`` (the message names them); or the processes disagree on ``num_processes``.
    ValueError: a malformed address, count or id, in the arguments or the environment.
    RuntimeError: JAX already ran a computation in this process (too late to join).

  Example:
    >>> import jdist.distributed
    >>> jdist.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # doctest: +SKIP
  """
  if jax.distributed.is_initialized():
    return
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _int_setting(num_processes, ENV_NUM_PROCESSES, "num_processes", minimum=1)
  process_id = _int_setting(process_id, ENV_PROCESS_ID, "process_id", minimum=0)
  local_device_count = _int_setting(local_device_count, ENV_LOCAL_DEVICES, "local_device_count", minimum=1)
  timeout = _float_setting(timeout_s, ENV_INIT_TIMEOUT, "timeout_s", DEFAULT_TIMEOUT_S)
  heartbeat = int(_float_setting(heartbeat_timeout_s, ENV_HEARTBEAT_TIMEOUT, "heartbeat_timeout_s",
                                 DEFAULT_HEARTBEAT_TIMEOUT_S))
  collective = _int_setting(collective_timeout_s, ENV_COLLECTIVE_TIMEOUT, "collective_timeout_s", minimum=1)
  if cpu_collectives is not None and cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"Unknown cpu_collectives: {cpu_collectives!r}. It needs to be one of "
                     f"{list(CPU_COLLECTIVES)} (or None to keep JAX's setting).")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise ValueError(f"process_id {process_id} is out of range for {num_processes} processes; ids run from 0 to "
                     f"{num_processes - 1}. Give each process a different id in that range.")
  single = num_processes == 1 or (coordinator_address is None and num_processes is None and process_id is None
                                  and not _detect_cluster_requested() and not _cluster_detected())
  if _backend_started():
    if single and local_device_count is None and collective is None:
      return  # one process, no device setting to apply (cross-process collectives do not matter): nothing to do
    raise RuntimeError(
        "jdist.distributed.initialize() must run before JAX's first computation, but JAX has already started "
        "in this process (something called jax.devices(), created an array or ran a function). Call it right "
        "after `import jax`, at the top of the program.")

  # device and collective settings are read when the backend starts, so they go first
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", local_device_count)
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if collective is not None:
    _add_xla_flag("--xla_cpu_collective_timeout_seconds", collective)

  if single:
    return  # one process: nothing to join
  explicit = None not in (coordinator_address, num_processes, process_id)
  _announce_arrival(process_id)
  kwargs: dict[str, Any] = dict(heartbeat_timeout_seconds=max(1, heartbeat),
                                shutdown_timeout_seconds=max(1, int(shutdown_timeout_s)))
  deadline = time.monotonic() + timeout
  if explicit:
    _check_address(coordinator_address)
    _rendezvous(coordinator_address, num_processes, process_id, timeout)
    kwargs["cluster_detection_method"] = "deactivate"
  remaining = max(10.0, deadline - time.monotonic())  # everyone is up after the rendezvous: JAX joins fast
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=int(max(1, round(remaining))), **kwargs)
  except ValueError as e:
    raise ValueError(
        f"jax.distributed could not work out the multi-process settings ({e}). Pass coordinator_address, "
        f"num_processes and process_id, or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
        f"(jdist launch does), or run under a scheduler JAX detects (SLURM, Open MPI).") from None


def restart_count() -> int:
  """How many times ``jdist launch --max-restarts`` restarted this run before this process started (0 for
  the first start, and outside the launcher): like TorchElastic's ``TORCHELASTIC_RESTART_COUNT``."""
  raw = os.environ.get(ENV_RESTART_COUNT, "").strip()
  return int(raw) if raw.isdigit() else 0


def _announce_arrival(process_id: int | None) -> None:
  """Under ``jdist launch``: tells the launcher that this process got as far as joining the run (a file in
  ``$JDIST_LAUNCH_DIR``). After a failure, the launcher drops the slots whose process never did, if the run
  may shrink (``--min-processes``): a process that cannot even start is taken for a lost host."""
  directory = os.environ.get(ENV_LAUNCH_DIR)
  if directory and process_id is not None:
    try:
      with open(os.path.join(directory, f"arrived-{process_id}"), "w"):
        pass
    except OSError:  # the launcher went away, or the directory is not ours: nothing to tell
      pass


def process_index() -> int:
  """This process's index, 0 .. ``process_count() - 1`` (0 in a single-process run)."""
  return jax.process_index()


def process_count() -> int:
  """The number of processes in the run (1 without ``jax.distributed``)."""
  return jax.process_count()


def is_coordinator() -> bool:
  """True on process 0, the one that writes logs and summaries."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called ``name``; a no-op for one process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def check_batch_sizes(local_size: int, tag: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Raises ``ValueError`` unless every process passes ``local_size`` examples at the check called ``tag``.

  In a multi-process run each process passes its share of the global batch (``jdist.batches.put_batch``),
  and the global size is taken as its share times the process count. Unequal shares would give the
  processes different global shapes: a silently skewed average, or collectives that never match. This
  compares the shares through JAX's coordination service (its key-value store: no device work, so a step
  still running is not waited for). A process whose batch size changed while the others' did not (a
  ragged last batch in one process) reaches the check alone: it raises after ``timeout_s`` instead of
  hanging, and ``initialize``'s heartbeat then stops the others. A no-op on one process.

  Args:
    local_size: the examples this process passes.
    tag: names this check; the same in every process and used once (``fit`` uses the run and the step).
    timeout_s: how long to wait for the other processes.
  """
  count, me = jax.process_count(), jax.process_index()
  if count == 1:
    return
  client = _client()
  prefix = f"jdist/batch_size/{tag}/"
  client.key_value_set(prefix + str(me), str(int(local_size)))
  sizes, missing, deadline = {me: int(local_size)}, [], time.monotonic() + timeout_s
  for other in (q for q in range(count) if q != me):
    try:
      wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
      sizes[other] = int(client.blocking_key_value_get(prefix + str(other), wait_ms))
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise
      missing.append(other)
  fix = (f"Every process must pass the same number of examples at every step, its share of the global batch "
         f"(global batch / {count}); a loader that may end on a ragged batch must drop it in every process "
         f"(jdist.data.ArrayLoader does).")
  if missing:
    raise ValueError(f"Process {me} passed {local_size} examples at {tag} (a new batch size, or its first batch), "
                     f"but process(es) {missing} did not reach this check within {timeout_s:g} s: their batch size "
                     f"did not change, or their data is that much slower. {fix}")
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"process {q}: {n}" for q, n in sorted(sizes.items()))
    raise ValueError(f"The processes passed different numbers of examples at {tag} ({listed}). {fix}")


def next_run(name: str) -> int:
  """This process's count of calls with ``name`` (1, 2, ...), kept by JAX's coordination service: the
  same in every process that makes the same calls, so it tells the checks of one run from the next."""
  return int(_client().key_value_increment(f"jdist/runs/{name}/{jax.process_index()}", 1))


def _client():
  from jax._src import (
    distributed as jax_distributed,  # the client orbax-checkpoint uses too
  )

  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialised in this multi-process run: call "
                       "jdist.distributed.initialize() first.")
  return client


def shutdown() -> None:
  """Leaves the multi-process run (``jax.distributed.shutdown``); a no-op when not initialised."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


# ---------------------------------------------------------------------------------------------- helpers


def _int_setting(value: Any, env: str, what: str, *, minimum: int) -> int | None:
  source = what
  if value is None:
    raw = os.environ.get(env, "").strip()
    if not raw:
      return None
    source = f"${env}"
    try:
      value = int(raw)
    except ValueError:
      raise ValueError(f"{source} must be an integer >= {minimum}, got {raw!r}.") from None
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{source} must be an integer >= {minimum}, got {value!r}.")
  return value


def _float_setting(value: Any, env: str, what: str, default: float) -> float:
  source = what
  if value is None:
    raw = os.environ.get(env, "").strip()
    if not raw:
      return float(default)
    source = f"${env}"
    try:
      value = float(raw)
    except ValueError:
      raise ValueError(f"{source} must be a number of seconds > 0, got {raw!r}.") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{source} must be a number of seconds > 0, got {value!r}.")
  return float(value)


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # pragma: no cover - private API moved; JAX checks again itself
    return False


def _cluster_detected() -> bool:
  """Whether JAX's cluster detection would find a multi-process environment (SLURM, Open MPI, TPU...)."""
  try:
    from jax._src import clusters

    # opt-in methods (mpi4py: "present" wherever the package imports) only count when asked for
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
               if not getattr(env, "opt_in_only_method", False))
  except (ImportError, AttributeError):  # pragma: no cover - private API moved: ask JAX directly
    return True


def _add_xla_flag(flag: str, value: Any) -> None:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag + "=")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"{flag}={value}"])


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator address {address!r} is not of the form host:port (e.g. 10.0.0.1:1234 or "
                     f"node001:1234). Give process 0's address and a free port.")
  return host.strip("[]"), int(port)


def _check_address(address: Any) -> None:
  if not isinstance(address, str):
    raise TypeError(f"coordinator_address must be a 'host:port' string, got {type(address).__name__}.")
  _split_address(address)


def _readline(conn: socket.socket, limit: int = 4096) -> str:
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(256)
    if not chunk:
      break
    data += chunk
    if len(data) > limit:
      break
  return data.decode(errors="replace").strip()


def _rendezvous(address: str, num_processes: int, process_id: int, timeout: float) -> None:
  """Meets every process on the coordinator port before JAX's service starts there.

  Process 0 listens on the port, the others connect and say who they are; when all have arrived,
  process 0 tells them to go on and closes the port for JAX's coordinator. Unlike JAX's own start-up
  timeout (which aborts the process with ``DEADLINE_EXCEEDED``), this raises a Python error that names
  the coordinator or the missing processes.
  """
  host, port = _split_address(address)
  if process_id == 0:
    _serve(address, port, num_processes, timeout)
  else:
    _join(address, host, port, num_processes, process_id, timeout)


def _serve(address: str, port: int, num_processes: int, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  try:
    if socket.has_dualstack_ipv6():
      server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      server = socket.create_server(("", port))
  except OSError as e:
    raise DistributedError(
        f"process 0 cannot listen on port {port} for the coordinator of {address} ({e.strerror or e}). Another "
        f"program may be using it: choose a free port.") from None
  joined: dict[int, socket.socket] = {}
  try:
    server.settimeout(0.2)
    while len(joined) < num_processes - 1 and time.monotonic() < deadline:
      try:
        conn, _ = server.accept()
      except (socket.timeout, BlockingIOError):
        continue
      try:
        conn.settimeout(min(5.0, max(0.5, deadline - time.monotonic())))
        words = _readline(conn).split()
      except OSError:
        conn.close()
        continue
      if len(words) != 3 or words[0] != _HELLO or not words[1].isdigit() or not words[2].isdigit():
        conn.close()  # not one of ours (a port scan, a stray client): ignore it
        continue
      pid, theirs = int(words[1]), int(words[2])
      problem = None
      if theirs != num_processes:
        problem = (f"process {pid} was started for {theirs} processes but process 0 for {num_processes}; start every "
                   f"process with the same number of processes")
      elif not 0 < pid < num_processes:
        problem = f"a process claims id {pid}, outside 1 .. {num_processes - 1}"
      elif pid in joined:
        problem = f"two processes claim id {pid}; give each process a different id"
      if problem is not None:
        for c in (*joined.values(), conn):
          _send(c, f"error {problem}")
          c.close()
        raise DistributedError(f"jdist.distributed: {problem}.")
      joined[pid] = conn
    missing = [p for p in range(1, num_processes) if p not in joined]
    if missing:
      for c in joined.values():
        _send(c, "missing " + ",".join(map(str, missing)))
      raise DistributedError(
          f"process 0 (coordinator at {address}) waited {timeout:g} s but process(es) {missing} of {num_processes} "
          f"never arrived (arrived: {sorted(joined) or 'none'}). Check that they were started with "
          f"{ENV_COORDINATOR}={address} (or this coordinator address), that they can reach this host on port "
          f"{port}, and their logs for an earlier error; or allow longer with timeout_s / {ENV_INIT_TIMEOUT}.")
    for c in joined.values():
      _send(c, "go")
    for c in joined.values():  # let the clients close first, so the port is not left in TIME_WAIT here
      try:
        c.settimeout(2.0)
        c.recv(16)
      except OSError:
        pass
  finally:
    for c in joined.values():
      c.close()
    server.close()


def _send(conn: socket.socket, text: str) -> None:
  try:
    conn.sendall((text + "\n").encode())
  except OSError:
    pass


def _join(address: str, host: str, port: int, num_processes: int, process_id: int, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  last = "nothing answered"
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise DistributedError(
          f"process {process_id} of {num_processes}: no coordinator at {address} after {timeout:g} s ({last}). "
          f"Process 0 runs the coordinator: check that it was started, that {address} is its host and port, and "
          f"that this host can reach it; or allow longer with timeout_s / {ENV_INIT_TIMEOUT}.")
    try:
      conn = socket.create_connection((host, port), timeout=min(2.0, remaining))
      break
    except OSError as e:
      last = e.strerror or str(e) or type(e).__name__
      time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
  with conn:
    try:
      conn.sendall(f"{_HELLO} {process_id} {num_processes}\n".encode())
      # process 0 answers by its own deadline, at most `timeout` after it started listening (before now)
      conn.settimeout(timeout + 5.0)
      reply = _readline(conn)
    except OSError as e:
      reply = f"lost ({e.strerror or e})"
  if reply == "go":
    time.sleep(0.1)  # give process 0 a moment to close the port and start JAX's coordinator there
    return
  if reply.startswith("missing "):
    raise DistributedError(
        f"process {process_id} of {num_processes}: the coordinator at {address} reports that process(es) "
        f"[{reply.split(' ', 1)[1].replace(',', ', ')}] never arrived within {timeout:g} s. Check that they were "
        f"started and their logs for an earlier error.")
  if reply.startswith("error "):
    raise DistributedError(f"process {process_id} of {num_processes}: {reply[6:]}.")
  raise DistributedError(
      f"process {process_id} of {num_processes}: the coordinator at {address} accepted the connection but did "
      f"not confirm the start ({reply or 'connection closed'}). Is {address} really process 0 of this run?")
