"""Batches: check their shape, and place them on a mesh (one process or many)."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist._checks import check_axes
from jdist._types import Batch
from jdist.errors import BatchError
from jdist.mesh import axis_size


def batch_size(batch: Batch, *, multiple_of: int = 1, what: str = "batch") -> int:
  """Returns the common leading size of ``batch``'s leaves, checking it divides by ``multiple_of``.

  Raises:
    BatchError (a ValueError): if the batch is empty or has no examples, has a scalar leaf, its leaves disagree on the
      leading size, or the size is not a multiple of ``multiple_of``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
  if not leaves:
    raise BatchError(f"The {what} is empty; expected a pytree of arrays with a leading example axis.", {})
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0:
      raise BatchError(f"{what} leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every leaf needs "
                       f"a leading example axis.", sizes)
    sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
  if len(set(sizes.values())) > 1:
    listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise BatchError(f"{what} leaves have different leading sizes ({listing}); every leaf must hold the "
                     f"same number of examples.", sizes)
  size = next(iter(sizes.values()))
  if size == 0:  # the mean loss of no examples is nan, and the optimizer would still take a step
    raise BatchError(f"The {what} has no examples (leading size 0); pass at least {multiple_of} example(s)"
                     + (f", a multiple of {multiple_of}." if multiple_of > 1 else "."), sizes, multiple_of)
  if size % multiple_of:
    raise BatchError(
        f"Global {what} size {size} is not divisible by {multiple_of} (the devices the {what} is split over, "
        f"times the micro-batches if any). Use a {what} size that is a multiple of {multiple_of}, e.g. "
        f"{max(multiple_of, size - size % multiple_of)}.", sizes, multiple_of)
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

