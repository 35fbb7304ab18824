"""Batches of the emulated workers: ``[num_workers, b, ...]``, worker ``w``'s slice at index ``w``."""
from __future__ import annotations

import jax
import numpy as np

from jdist import batches as batch_lib
from jdist._checks import check_positive_int
from jdist._types import Batch
from jdist.errors import BatchError, OptionError


def split_workers(batch: Batch, num_workers: int, *, process_count: int | None = None) -> Batch:
  """Reshapes a batch of ``num_workers * b`` examples to ``[num_workers, b, ...]``, the layout ``async_sgd``
  takes (worker ``w`` gets examples ``w*b .. (w+1)*b - 1``), e.g. for ``ArrayLoader`` data.

  In a multi-process run each process holds only its share of the global batch (``ArrayLoader`` yields
  rows ``[p * B/P, (p + 1) * B/P)`` in process ``p``), which is exactly the data of workers
  ``p * N/P .. (p + 1) * N/P - 1``; so the share is split into this process's ``num_workers / P`` workers,
  the slices ``async_sgd``'s ``shard_batch`` takes there. The union over processes, in process order, is
  what one process gets from the global batch.

  Args:
    batch: a pytree of arrays sharing the leading (example) axis: the global batch in one process, this
      process's share in a multi-process run.
    num_workers: N, all the workers of the run.
    process_count: P, by default ``jax.process_count()``; N must be a multiple of it.

  Returns:
    The batch with leaves ``[N / P, b, ...]`` (numpy arrays).

  Raises:
    OptionError: N not a multiple of P. BatchError: a batch size not a multiple of N / P.

  Example:
    >>> split_workers({"x": np.zeros((8, 3))}, 4)["x"].shape
    (4, 2, 3)
  """
  n = check_positive_int(num_workers, "num_workers")
  count = check_positive_int(jax.process_count() if process_count is None else process_count, "process_count")
  if n % count:
    raise OptionError("num_workers", n, f"a multiple of the {count} processes (each runs as many workers)")
  local = n // count
  what = "batch" if count == 1 else "process-local batch"
  size = batch_lib.batch_size(batch, what=what)
  if size % local:
    workers = (f"num_workers={n}" if count == 1
               else f"this process's {local} workers (num_workers={n} / {count} processes)")
    raise BatchError(
        f"split_workers: the {what} has {size} examples, which do not split evenly over {workers}: every worker "
        f"gets the same number b of examples. Use a {what} of a multiple of {local} examples, e.g. "
        f"{max(local, size - size % local)}, or a number of workers that divides it.", {"<batch>": size}, local)
  return jax.tree.map(lambda x: np.asarray(x).reshape(local, x.shape[0] // local, *x.shape[1:]), batch)


def process_local(batch: Batch) -> bool:
  """Whether ``batch`` is this process's part (host data in a multi-process run), not global arrays."""
  return jax.process_count() > 1 and not batch_lib.holds_global_arrays(batch)


def check_worker_axis(batch: Batch, n: int, *, local: bool = False) -> None:
  """Checks axis 0 of every leaf is the workers: all ``n`` of them, or with ``local`` the ``n / P`` of this process
  (a multi-process run, where each process passes its own workers); and that the leaves with examples agree on
  the per-worker batch size ``b`` at axis 1, which must be >= 1.

  Raises:
    BatchError: with ``sizes`` the offending sizes by leaf path (the worker axis, or ``b``).
  """
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  count = jax.process_count() if local else 1
  mine = n // count
  layout = "[num_workers, b, ...]" if count == 1 else "[num_workers / processes, b, ...]"
  names = [jax.tree_util.keystr(path) or "<root>" for path, _ in leaves]
  shapes = [np.shape(leaf) for _, leaf in leaves]
  if not leaves:
    raise BatchError("The batch is empty; expected a pytree of arrays.", {})
  for name, shape in zip(names, shapes):
    if not shape or shape[0] != mine:
      got = f"shape {shape}" if not shape else f"axis 0 of size {shape[0]} (shape {shape})"
      if count == 1:
        why = (f"but num_workers is {n}: each leaf must be {layout}, worker w's examples at index w. Split a global "
               f"batch of {n}*b examples with jdist.split_workers(batch, {n}).")
      else:
        why = (f"but in a run of {count} processes each passes only the slices of its own {mine} of the {n} workers: "
               f"each leaf must be {layout}, {mine} at axis 0. Split this process's share of the global batch with "
               f"jdist.split_workers(batch, {n}).")
      who = "" if count == 1 else f"process {jax.process_index()}'s "
      raise BatchError(f"async_sgd: {who}batch leaf {name} has {got}, {why}", {name: shape[0] if shape else None}, mine)
  sizes = {name: shape[1] for name, shape in zip(names, shapes) if len(shape) > 1}  # a leaf [N] has no examples
  if len(set(sizes.values())) > 1:
    listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
    raise BatchError(f"async_sgd: batch leaves have different per-worker batch sizes b at axis 1 ({listing}); every "
                     f"leaf must be {layout} with the same b. Split a global batch whose leaves all hold the same "
                     f"number of examples with jdist.split_workers(batch, {n}).", sizes)
  if 0 in sizes.values():  # the mean loss of no examples is nan, and the server would still apply it
    raise BatchError(f"async_sgd: the batch gives each worker no examples (b = 0 at axis 1); each leaf must be "
                     f"{layout} with b >= 1.", sizes)
