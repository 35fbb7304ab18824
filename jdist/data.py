"""Host-side batches from in-memory arrays: seeded shuffles per epoch and a position that resumes."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from jdist import batches as batch_lib


class ArrayLoader:
  """Yields batches of ``batch_size`` examples (this process's share of them) from a dict of numpy arrays.

  Each epoch is a fresh permutation drawn from ``np.random.default_rng((seed, epoch))``, so the order
  depends only on the seed and the epoch: a loader restored with ``set_state`` continues exactly where
  the saved one was, mid-epoch included. The remainder that does not fill a batch is dropped.

  In a multi-process run every process holds the same arrays and draws the same global batch, then
  yields only its share: process ``p`` of ``P`` gets examples ``[p * B/P, (p + 1) * B/P)`` of it, so the
  processes' batches in process order are exactly the single-process batch (the convention of
  ``jdist.batches.put_batch`` and every strategy's ``shard_batch``). The position (``get_state``) counts
  global batches, so a checkpoint taken with any number of processes resumes with any other.

  Args:
    arrays: name -> array, all with the same leading (example) size.
    batch_size: global batch size (examples per step).
    seed: the shuffle seed.
    shuffle: whether to permute each epoch (``False`` keeps the given order).
    process_index: which share of each batch to yield (default ``jax.process_index()``).
    process_count: into how many shares each batch is split (default ``jax.process_count()``);
      must divide ``batch_size``.

  Example:
    >>> loader = ArrayLoader({"x": np.zeros((10, 2)), "y": np.zeros(10)}, batch_size=4, seed=0)
    >>> batch = next(iter(loader)); batch["x"].shape
    (4, 2)
  """

  def __init__(self, arrays: Mapping[str, Any], batch_size: int, *, seed: int = 0, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
    if not isinstance(arrays, Mapping):
      raise TypeError(f"ArrayLoader takes a dict of arrays (name -> array, e.g. {{'x': x, 'y': y}}), got a "
                      f"{type(arrays).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = batch_lib.batch_size(self.arrays, what="data set")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if batch_size > n:
      raise ValueError(f"batch_size {batch_size} is larger than the data set ({n} examples); use at most {n}.")
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(process_count, int) or process_count < 1 or not isinstance(process_index, int) or not (
        0 <= process_index < process_count):
      raise ValueError(f"process_index must be in 0 .. process_count - 1 and process_count >= 1, got "
                       f"process_index={process_index!r}, process_count={process_count!r}.")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes; each process "
                       f"yields an equal share. Use a multiple of {process_count}, e.g. "
                       f"{max(process_count, batch_size - batch_size % process_count)}.")
    self.process_index, self.process_count = process_index, process_count
    self.num_examples = n
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.epoch = 0
    self.index = 0  # batches already taken from the current epoch

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    # the position lives on the loader, not the iterator: a set_state between two batches moves every
    # iterator of this loader to it (the order is drawn again when the epoch is not the one drawn)
    share = self.batch_size // self.process_count
    drawn, order = None, None
    while True:
      if self.index >= self.batches_per_epoch:
        self.epoch, self.index = self.epoch + 1, 0
      if drawn != self.epoch:
        drawn, order = self.epoch, self._order(self.epoch)
      start = self.index * self.batch_size + self.process_index * share
      idx = order[start:start + share]
      self.index += 1
      yield {k: v[idx] for k, v in self.arrays.items()}

  def get_state(self) -> dict[str, int]:
    """The position, and what it is a position in: enough to resume the same sequence of batches."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
            "num_examples": self.num_examples, "shuffle": int(self.shuffle)}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Continues from a ``get_state`` position. The loader must draw the same batches: the same seed,
    global batch size, number of examples and shuffling (a position counts batches of one sequence; in
    another it would skip or repeat examples)."""
    mine = self.get_state()
    for key in ("seed", "batch_size", "num_examples", "shuffle"):
      if key in state and int(state[key]) != mine[key]:  # positions saved before 2026-11-28 lack the last 3
        raise ValueError(f"The data position was saved with {key}={int(state[key])}, but this loader has "
                         f"{key}={mine[key]}: resuming would skip or repeat examples. Resume with the same data "
                         f"settings, or start a new run (another run_dir / checkpoint directory).")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
