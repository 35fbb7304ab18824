"""Device meshes: build them, emulate devices on CPU, place batches and replicated values."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist._types import Batch, PyTree


def emulate_devices(n: int) -> list[jax.Device]:
  """Arranges for JAX's CPU backend to expose ``n`` devices.

  Must be called before JAX runs its first operation (the backend reads the setting once). If JAX has
  already started with at least ``n`` CPU devices this is a no-op.

  Args:
    n: number of CPU devices wanted, >= 1.

  Returns:
    The CPU devices (at least ``n``).

  Raises:
    ValueError: if ``n`` < 1.
    RuntimeError: if JAX already started with fewer than ``n`` CPU devices.

  Example:
    >>> import jdist
    >>> devices = jdist.emulate_devices(8)  # doctest: +SKIP
  """
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"emulate_devices expects a positive int number of devices, got {n!r}.")
  n = int(n)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # the backend has started; check what it has below
  have = jax.devices("cpu")
  if len(have) < n:
    raise RuntimeError(
        f"JAX already started with {len(have)} CPU device(s), so {n} cannot be emulated any more. "
        f"Call jdist.emulate_devices({n}) right after `import jax`, before any JAX operation, or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python.")
  return have


def make_mesh(*, devices: Sequence[jax.Device] | None = None, **axes: int) -> Mesh:
  """Builds a named device mesh, e.g. ``make_mesh(data=2, model=4)``.

  Axes are laid out in the order given. Their sizes must multiply to the number of devices; one size
  may be -1, meaning "whatever is left". Every axis is ``AxisType.Auto`` so that both ``jax.shard_map``
  and GSPMD-sharded ``jax.jit`` accept arrays placed on it (see docs/pitfalls.md, pitfall 2).

  Args:
    devices: the devices to use, by default ``jax.devices()``.
    **axes: axis name -> size (a positive int, or -1 for one axis).

  Returns:
    A ``jax.sharding.Mesh``.

  Raises:
    ValueError: no axes, a bad size, sizes that do not multiply to the device count, a mesh larger
      than the devices available, or a device given twice.

  Example:
    >>> mesh = make_mesh(data=-1)  # every device on one "data" axis
  """
  if not axes:
    raise ValueError("make_mesh needs at least one axis, e.g. make_mesh(data=8) or make_mesh(data=-1).")
  if isinstance(devices, np.ndarray):  # e.g. another mesh's devices: its layout is not kept
    devices = devices.ravel().tolist()
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh got an empty device list.")
  if len(set(devices)) != len(devices):
    seen: set = set()
    repeated = sorted({str(d) for d in devices if d in seen or seen.add(d)})
    raise ValueError(f"make_mesh got the same device more than once ({', '.join(repeated)}); a mesh needs "
                     f"{len(devices)} distinct devices. Pass each device once, e.g. devices=jax.devices()[:n].")
  names = tuple(axes)
  sizes = list(axes.values())
  for name, size in axes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {name!r} has size {size!r}; expected a positive int or -1 (fill the rest).")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"Only one mesh axis may have size -1, got {len(free)}: {axes}.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if len(devices) % known:
      raise ValueError(
          f"Mesh axes {axes}: the fixed sizes multiply to {known}, which does not divide the "
          f"{len(devices)} devices, so -1 cannot fill the rest. Choose sizes that divide {len(devices)}.")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} needs {total} devices but only {len(devices)} are available "
        f"({devices[0].platform}). Use smaller axes, or on CPU emulate more devices with "
        f"jdist.emulate_devices({total}) before JAX starts.")
  if total != len(devices):
    raise ValueError(
        f"Mesh axis sizes {dict(zip(names, sizes))} multiply to {total}, but {len(devices)} devices were "
        f"given. Make the sizes multiply to {len(devices)} (one of them may be -1), or pass "
        f"devices=jax.devices()[:{total}].")
  return jax.make_mesh(tuple(int(s) for s in sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
  """The number of devices along ``axis`` (a name or a tuple of names) of ``mesh``."""
  return math.prod(mesh.shape[a] for a in as_axes(axis))


def as_axes(axis: str | Sequence[str]) -> tuple[str, ...]:
  """Normalises an axis argument to a tuple of names."""
  return (axis,) if isinstance(axis, str) else tuple(axis)


def check_mesh(mesh: Any) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, e.g. jdist.make_mesh(data=-1), got {type(mesh).__name__}.")
  return mesh


class IdleAxesError(ValueError):
  """A mesh axis of more than one device that the strategy does not use (``check_no_idle_axes``).

  Attributes:
    problem: the first sentence of the message (what is wrong, without the Python fix).
    idle: the unused axes and their sizes. kept: the axes of the smaller mesh and their sizes.
  """

  def __init__(self, problem: str, fix: str, idle: dict[str, int], kept: dict[str, int]):
    super().__init__(f"{problem} {fix}")
    self.problem, self.idle, self.kept = problem, idle, kept


def check_no_idle_axes(mesh: Mesh, used: Sequence[str], *, who: str, fix: str) -> None:
  """Refuses a mesh with an axis of more than one device that ``who`` does not use: the devices along it
  would all hold the same data and compute the same step, a copy of the work that only costs time.

  Args:
    used: the axes ``who`` splits the batch, the parameters or the workers over.
    fix: how to use such an axis with ``who`` (its argument that names axes), said in the message.

  Raises:
    IdleAxesError: a ``ValueError`` that names the axes and the smaller mesh.
  """
  idle = {a: int(n) for a, n in mesh.shape.items() if a not in used and n > 1}
  if idle:
    # the smaller mesh: the axes used (or, if none is, one device on the first axis)
    kept = {a: int(mesh.shape[a]) for a in mesh.axis_names if a in used} or {mesh.axis_names[0]: 1}
    it = "it" if len(idle) == 1 else "them"
    problem = (f"{who} uses mesh axes {tuple(a for a in mesh.axis_names if a in used)}, but the mesh also has "
               f"{', '.join(f'{a!r} of size {n}' for a, n in idle.items())}: the devices along {it} would each "
               f"compute the same thing.")
    raise IdleAxesError(problem, f"{fix}, or build the mesh without {it}, e.g. jdist.make_mesh("
                        f"{', '.join(f'{a}={n}' for a, n in kept.items())}, devices=jax.devices()"
                        f"[:{math.prod(kept.values())}]).", idle, kept)


def check_axes(mesh: Mesh, axis: str | Sequence[str], *, what: str = "axis") -> tuple[str, ...]:
  """Returns ``axis`` as a tuple after checking ``mesh`` is a mesh and every name is one of its axes, once."""
  check_mesh(mesh)
  axes = as_axes(axis)
  if not axes or not all(isinstance(a, str) for a in axes):
    raise TypeError(f"{what} must be a mesh axis name or a tuple of names, got {axis!r}.")
  if len(set(axes)) != len(axes):
    raise ValueError(f"{what} {axis!r} names a mesh axis more than once; name each axis once.")
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(
        f"{what} {missing[0]!r} is not an axis of the mesh; the mesh has axes {tuple(mesh.axis_names)} "
        f"with sizes {dict(mesh.shape)}. Pass one of those names or build the mesh with "
        f"jdist.make_mesh({missing[0]}=...).")
  return axes


def one_axis(axis: Any, *, who: str, example: str = "data") -> str:
  """``axis`` as one mesh axis name (a str, or a tuple or list of one str), for ``who``, a strategy that
  runs over a single axis.

  Raises:
    ValueError: several (or no) names. TypeError: not a name.
  """
  if isinstance(axis, str):
    return axis
  if isinstance(axis, (tuple, list)) and all(isinstance(a, str) for a in axis):
    if len(axis) == 1:
      return axis[0]
    raise ValueError(
        f"{who} runs over one mesh axis, got axis={axis!r} ({len(axis)} names). Pass one name, e.g. "
        f"axis={axis[0] if axis else example!r}; to use the devices of several axes, build a mesh with one axis "
        f"over them, e.g. jdist.make_mesh({example}=-1, devices=mesh.devices.ravel()).")
  raise TypeError(f"axis must be a mesh axis name (a str), got {axis!r} ({type(axis).__name__}).")


def check_axis(mesh: Mesh, axis: Any, *, who: str, what: str = "axis", example: str = "data") -> str:
  """``one_axis``, then checks the name is an axis of ``mesh``."""
  return check_axes(mesh, one_axis(axis, who=who, example=example), what=what)[0]


def batch_size(batch: Batch, *, multiple_of: int = 1, what: str = "batch") -> int:
  """Returns the common leading size of ``batch``'s leaves, checking it divides by ``multiple_of``.

  Raises:
    ValueError: if the batch is empty or has no examples, has a scalar leaf, its leaves disagree on the
      leading size, or the size is not a multiple of ``multiple_of``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
  if not leaves:
    raise ValueError(f"The {what} is empty; expected a pytree of arrays with a leading example axis.")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise ValueError(f"{what} leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every leaf needs "
                       f"a leading example axis.")
    sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
  if len(set(sizes.values())) > 1:
    listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise ValueError(f"{what} leaves have different leading sizes ({listing}); every leaf must hold the "
                     f"same number of examples.")
  size = next(iter(sizes.values()))
  if size == 0:  # the mean loss of no examples is nan, and the optimizer would still take a step
    raise ValueError(f"The {what} has no examples (leading size 0); pass at least {multiple_of} example(s)"
                     + (f", a multiple of {multiple_of}." if multiple_of > 1 else "."))
  if size % multiple_of:
    raise ValueError(
        f"Global {what} size {size} is not divisible by {multiple_of} (the devices the {what} is split over, "
        f"times the micro-batches if any). Use a {what} size that is a multiple of {multiple_of}, e.g. "
        f"{max(multiple_of, size - size % multiple_of)}.")
  return size


def shard_batch(batch: Batch, mesh: Mesh, axis: str | Sequence[str] = "data") -> Batch:
  """Places a host batch on ``mesh``, split along its leading axis over ``axis``.

  In a single process ``batch`` is the global batch; in a multi-process run it is this process's share
  (see ``put_batch``).
  """
  axes = check_axes(mesh, axis)
  return put_batch(batch, NamedSharding(mesh, P(axes)), multiple_of=axis_size(mesh, axes))


def holds_global_arrays(batch: Batch) -> bool:
  """Whether ``batch`` holds global ``jax.Array``s (not fully addressable here), which ``put_batch`` passes
  on as they are."""
  return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(batch))


def put_batch(batch: Batch, sharding: NamedSharding, *, multiple_of: int = 1, what: str = "batch",
              gather: bool = False) -> Batch:
  """Places a batch on ``sharding``, its leading (example) axis split as the sharding says.

  The convention for multi-process runs: every process passes only its own share, the
  ``global batch / jax.process_count()`` examples that process ``p`` holds at rows
  ``[p * B/P, (p + 1) * B/P)`` of the global batch (what ``jdist.data.ArrayLoader`` yields in each
  process), and the global array is assembled with ``jax.make_array_from_process_local_data``. So the
  union of the processes' batches, in process order, is the batch a single process would get.

  - One process: ``batch`` is the global batch; ``jax.device_put``.
  - Several processes: ``batch`` is this process's share; leaves that are already global (not fully
    addressable) ``jax.Array``s are passed to ``jax.device_put`` as they are. Every process must pass
    the same number of examples (``ArrayLoader`` does): the global size is this process's times the
    process count. Unequal shares give the processes different global shapes (a skewed average, or
    collectives that never match): a loader that may end on a ragged batch must drop it in all.
    ``jdist.fit`` compares the shares at the first batch and whenever a process's batch size changes
    (``jdist.distributed.check_batch_sizes``, which a hand-written loop can call too); this function
    does not, to cost nothing per batch.

  Args:
    batch: a pytree of arrays sharing the leading axis.
    sharding: a ``NamedSharding`` whose first spec entry names the axes the examples are split over.
    multiple_of: the global batch size must be a multiple of this (devices x micro-batches).
    what: the name used in error messages.
    gather: when this process's devices need rows of other processes' shares (a batch replicated over
      an axis that spans processes, as a pipeline's is, or split over an axis inside each process),
      gather the shares on every host first (``multihost_utils.process_allgather``) instead of raising.

  Returns:
    The batch as global ``jax.Array``s with ``sharding``.

  Raises:
    ValueError: a global batch not divisible by ``multiple_of``, leaves with different leading sizes,
      or a mesh on which this process's devices do not hold rows ``[p * B/P, (p + 1) * B/P)`` of the
      batch (the batch axes must run across processes, in process order, as ``make_mesh`` lays them out).
  """
  if jax.process_count() == 1 or holds_global_arrays(batch):
    batch_size(batch, multiple_of=multiple_of, what=what)
    return jax.device_put(batch, sharding)
  local = batch_size(batch, what=f"process-local {what}")
  try:
    global_size = process_batch_rows(sharding, local)[2]
  except ValueError:
    if not gather:
      raise
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(jax.tree.map(np.asarray, batch), tiled=True)
    batch_size(full, multiple_of=multiple_of, what=what)
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), full)
  if global_size % multiple_of:
    per = multiple_of // math.gcd(multiple_of, jax.process_count())
    raise ValueError(
        f"Global {what} size {global_size} ({jax.process_count()} processes x {local} examples each) is not "
        f"divisible by {multiple_of} (the devices it is split over, times the micro-batches if any). Give each "
        f"process a multiple of {per} examples.")
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (global_size, *np.shape(x)[1:])),
      batch)


def process_batch_rows(sharding: NamedSharding, local_size: int) -> tuple[int, int, int]:
  """``(start, stop, global_size)``: the rows of the global batch this process's ``local_size`` examples are.

  Raises:
    ValueError: if this process's devices do not hold rows ``[p * B/P, (p + 1) * B/P)`` of the batch
      (e.g. a batch axis inside each process, or devices of different processes interleaved on it), or
      ``local_size`` does not split evenly over them.
  """
  spec = tuple(sharding.spec)
  lead = spec[0] if spec else None
  blocks_total = axis_size(sharding.mesh, lead) if lead is not None else 1
  rows = NamedSharding(sharding.mesh, P(lead))  # one row per block of the leading axis
  blocks = sorted({(idx[0].start or 0) for idx in rows.addressable_devices_indices_map((blocks_total,)).values()})
  mine, p, count = len(blocks), jax.process_index(), jax.process_count()
  expected = list(range(p * blocks_total // count, (p + 1) * blocks_total // count))
  if blocks_total % count or blocks != expected:
    raise ValueError(
        f"Process {p} of {count} holds blocks {blocks} of the {blocks_total} blocks the batch is split into over "
        f"mesh axes {lead!r}, but each process passes only its own share of the global batch, which must be "
        f"blocks {expected} (process p holds rows [p * B/{count}, (p + 1) * B/{count})). Split the batch over "
        f"axes that run across processes in process order, e.g. jdist.make_mesh(data=-1) or "
        f"make_mesh(data={count}, model=...), with a multiple of {count} devices on them.")
  if local_size % mine:
    raise ValueError(f"The process-local batch has {local_size} examples, which do not split evenly over the "
                     f"{mine} batch shards of process {p}. Use a multiple of {mine} examples per process.")
  block = local_size // mine
  return blocks[0] * block, (blocks[-1] + 1) * block, block * blocks_total


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Copies ``tree`` onto every device of ``mesh`` (fresh buffers, so donating them is safe).

  ``jax.device_put(..., may_alias=False)`` has been seen to reuse the source buffer for the shard on the
  source device, so a donated step would delete the caller's array; an explicit copy comes first.
  """
  fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return jax.device_put(fresh, NamedSharding(mesh, P()))
