"""Checkpoints with orbax-checkpoint that resume exactly and never lose or overwrite data.

A checkpoint is one orbax step directory holding two items: ``state`` (the whole ``TrainState``,
sharded arrays included) and ``meta`` (JSON: jdist's bookkeeping, a checksum per state leaf, and, apart
under ``"meta"``, the caller's own dict: ``fit`` keeps the data position and the callbacks' state there).
orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save leaves the
earlier checkpoints as they were. On restore the checksums are recomputed:
a truncated or corrupted checkpoint is reported by name instead of being loaded or ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdist._types import PyTree

FORMAT_VERSION = 2  # 2: the caller's meta under "meta", apart from jdist's keys (1: side by side)


def _reason(error: BaseException) -> str:
  """An exception's type and first line for a one-line message, without the tensorstore spec dump and
  bound-method repr that tensorstore's errors carry after it."""
  first = str(error).splitlines()[0] if str(error) else ""
  first = re.split(r" \[tensorstore_spec| See full TensorStore details", first)[0]
  return f"{type(error).__name__}: {first}"[:400]


class _OrphanedReads:
  """The one ``sys.unraisablehook`` filter that restores share while any of them runs (restores in several
  threads install it once and remove it after the last)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.users = 0
    self.previous: Any = None
    self.landed: list[float] = []  # when each dropped error arrived

  def hook(self, unraisable) -> None:
    tb = unraisable.exc_traceback
    if (type(unraisable.exc_value) is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
      self.landed.append(time.monotonic())
    else:
      self.previous(unraisable)


_ORPHANED_READS = _OrphanedReads()


@contextlib.contextmanager
def _quiet_orphaned_reads():
  """Drops the "Event loop is closed" tracebacks of a failed restore, and nothing else.

  orbax reads a checkpoint's arrays concurrently through tensorstore. When one read fails, the asyncio loop
  that awaited them closes with the others still in flight; each of those, finishing a moment later, calls
  the closed loop from a tensorstore thread, and Python prints that as an unraisable exception: one
  traceback per array, which says nothing that the ``CheckpointError`` (or the fallback) does not. Yields a
  flag to set when a read failed: the filter then stays until those reads have landed (within a millisecond).
  """
  state = _ORPHANED_READS
  with state.lock:
    if state.users == 0:
      state.previous, sys.unraisablehook = sys.unraisablehook, state.hook
    state.users += 1
  failed = [False]
  try:
    yield failed
  finally:
    if failed[0]:  # wait until no orphaned read has landed for 0.1 s (at most 2 s)
      start = time.monotonic()
      while time.monotonic() - start < 2.0 and time.monotonic() - max(state.landed, default=start) < 0.1:
        time.sleep(0.02)
    with state.lock:
      state.users -= 1
      if state.users == 0:
        if sys.unraisablehook == state.hook:  # not replaced by someone else meanwhile
          sys.unraisablehook = state.previous
        state.previous, state.landed = None, []


_NOT_GIVEN = object()  # a Checkpointer not told the order of the stacked layers (None means the model's order)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; nothing was overwritten."""


TIME_CHECK_EVERY = 10  # multi-process runs: steps between checks of process 0's clock for a save by time


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """Where and when ``jdist.fit`` saves checkpoints, and how it resumes.

  Attributes:
    directory: the checkpoint directory (created if missing); ``fit`` resumes from its latest step.
    every_steps: save after every this many steps (None: not by step count). Must be >= 1.
    every_seconds: also save when this many seconds passed since the last save (None: not by time). In a
      multi-process run the processes must agree (a save is collective): process 0's clock decides and is
      broadcast, on every ``TIME_CHECK_EVERY``-th step only (a broadcast waits for the devices), so a
      save by time comes up to ``TIME_CHECK_EVERY - 1`` steps late there.
    keep: how many of the newest checkpoints to keep on disk (>= 1).
    fallback: if the latest checkpoint cannot be read, resume from the newest readable one (moving the
      unreadable one into ``directory/unreadable/``) instead of stopping with an error.
    save_at_end: save once more when training ends (unless it ended on a NaN/Inf or other failure).
  """

  directory: str | os.PathLike
  every_steps: int | None = None
  every_seconds: float | None = None
  keep: int = 3
  fallback: bool = False
  save_at_end: bool = True

  def __post_init__(self):
    if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
      raise ValueError(f"checkpoint every_steps must be a positive int or None, got {self.every_steps!r}.")
    if self.every_seconds is not None and not self.every_seconds > 0:
      raise ValueError(f"checkpoint every_seconds must be > 0 or None, got {self.every_seconds!r}.")
    if not isinstance(self.keep, int) or self.keep < 1:
      raise ValueError(f"checkpoint keep must be a positive int, got {self.keep!r}.")


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 checksum of the bits of ``x``; any single changed element changes it."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).reshape(-1).astype(jnp.uint32)
  idx = jnp.arange(bits.size, dtype=jnp.uint32)
  return jnp.sum(bits * (2 * idx + 1), dtype=jnp.uint32) ^ (jnp.sum(bits, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1))


_checksums = jax.jit(lambda tree: [_leaf_checksum(x) for x in jax.tree.leaves(tree)])


def tree_checksums(tree: PyTree) -> list[int]:
  """One checksum per array leaf of ``tree`` (works on sharded, multi-process arrays)."""
  return [int(c) for c in jax.device_get(_checksums(tree))]


_finite = jax.jit(lambda leaves: [jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: PyTree) -> list[str]:
  """The paths of the floating-point leaves of ``tree`` that hold an inf or a nan (works on sharded,
  multi-process arrays)."""
  leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  finite = jax.device_get(_finite([x for _, x in leaves]))
  return [name for (name, _), ok in zip(leaves, finite) if not ok]


def abstract_like(tree: PyTree) -> PyTree:
  """Shape, dtype and sharding of every leaf: the template a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _leaf_types(tree: PyTree, is_leaf=None) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{path: (shape, dtype)}`` for the leaves of ``tree``, paths as "params/layers/0/w" (dict keys, field
  names and indices alike, as orbax's metadata names them)."""
  from jdist.strategies.model_parallel import path_str

  return {path_str(path): (tuple(np.shape(x)), str(np.dtype(x.dtype)))
          for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def _caller_meta(record: dict[str, Any]) -> dict[str, Any]:
  """The caller's meta of a checkpoint's record (format 1 kept it beside jdist's keys)."""
  if record.get("format", 1) >= 2:
    return dict(record.get("meta") or {})
  return {k: v for k, v in record.items() if k not in ("step", "checksums", "format", "layer_layout")}


class Checkpointer:
  """Saves and restores ``(state, meta)`` under ``config.directory`` with an orbax CheckpointManager.

  For a loop of your own (``jdist.fit`` uses it the same way)::

    ckpt = Checkpointer(CheckpointConfig(directory="runs/x/checkpoints", every_steps=100, keep=3))
    restored = ckpt.restore_latest(state)          # None, or (step, state, meta): into state's shapes and shardings
    if restored is not None:
      _, state, meta = restored
    ...
    if ckpt.due(step):
      ckpt.save(step, state, {"epoch": epoch})      # meta: your own JSON-able dict, given back as it was saved
    ckpt.close()

  ``meta`` is yours alone: jdist's own record (the step, the checksums, the format, the layer layout) is kept
  beside it and never mixed in.

  ``layer_layout``: how the state orders its stacked layers when not as the model does (a circular
  pipeline's ``strategy.info["layer_layout"]``; None: the model's order), as ``jdist.fit`` passes it. Given,
  every save records it and a checkpoint recorded with another is refused on restore: the shapes agree, so
  restoring it would scramble the layers. Not given, saves record nothing, and a checkpoint recorded in a
  pipeline's order is refused until it is given.
  """

  def __init__(self, config: CheckpointConfig, *, layer_layout: dict[str, Any] | None | object = _NOT_GIVEN):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.config = config
    self.layer_layout = dict(layer_layout) if isinstance(layer_layout, dict) else layer_layout
    self.directory = pathlib.Path(config.directory).absolute()
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise CheckpointError(f"Cannot create checkpoint directory {self.directory}: {e.strerror}. "
                            f"Choose a directory you can write to.") from None
    if not os.access(self.directory, os.W_OK | os.X_OK):
      raise CheckpointError(f"Checkpoint directory {self.directory} is not writable. Choose a directory you "
                            f"can write to, or fix its permissions.")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep, enable_async_checkpointing=False,
                                             create=True),
        # named up front, so the items' metadata can be read before anything is restored (``_mismatch``)
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    self.last_saved_step: int | None = None
    self.last_save_time = time.monotonic()

  def steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def due(self, step: int) -> bool:
    """Whether to save at ``step``. Every process of a run must answer the same (a save is collective), so
    with several processes the clock of process 0 decides a time-based save for all of them, checked on
    every ``TIME_CHECK_EVERY``-th step (the broadcast waits for the devices to finish the step)."""
    c = self.config
    if c.every_steps is not None and step % c.every_steps == 0:
      return True
    if c.every_seconds is None:
      return False
    if jax.process_count() == 1:
      return time.monotonic() - self.last_save_time >= c.every_seconds
    if step % TIME_CHECK_EVERY:
      return False
    from jax.experimental import multihost_utils

    by_time = time.monotonic() - self.last_save_time >= c.every_seconds
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(by_time)))

  def save(self, step: int, state: PyTree, meta: dict[str, Any] | None = None) -> pathlib.Path:
    """Writes ``state`` (any pytree of arrays) and ``meta`` (a JSON-able dict of yours) as checkpoint ``step``;
    returns its directory. Every process of a multi-process run must call it (the save is collective)."""
    ocp = self._ocp
    user = {} if meta is None else meta
    try:
      json.dumps(user)
    except TypeError as e:
      raise TypeError(f"Checkpointer.save's meta must be a JSON-able dict (numbers, strings, lists, dicts): "
                      f"{e}.") from None
    if not isinstance(user, dict):
      raise TypeError(f"Checkpointer.save's meta must be a dict, got {type(user).__name__}.")
    record = {"step": int(step), "checksums": tree_checksums(state), "format": FORMAT_VERSION, "meta": user}
    if self.layer_layout is not _NOT_GIVEN:
      record["layer_layout"] = self.layer_layout
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()
    self.last_saved_step = step
    self.last_save_time = time.monotonic()
    return self.step_path(step)

  def _restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    ocp = self._ocp
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(template)), meta=ocp.args.JsonRestore()))
    state, meta = restored.state, restored.meta
    if not isinstance(meta, dict) or "checksums" not in meta:
      raise ValueError("its metadata is missing or unreadable")
    if meta.get("step") != step:
      raise ValueError(f"its metadata names step {meta.get('step')}")
    if tree_checksums(state) != list(meta["checksums"]):
      raise ValueError("its arrays do not match the checksums recorded when it was saved (corrupted data)")
    return state, meta

  def restore_latest(self, template: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """The newest readable checkpoint as ``(step, state, meta)``, or None if the directory has none; ``state``
    has the shapes and shardings of ``template`` (arrays or ``jax.ShapeDtypeStruct``s), ``meta`` is the dict given
    to ``save``.

    Raises:
      CheckpointError: the newest checkpoint cannot be read and ``fallback`` is off (or none can).
    """
    with _quiet_orphaned_reads() as failed:
      return self._restore_newest(template, failed)

  def _restore_newest(self, template: PyTree, failed: list[bool]) -> tuple[int, PyTree, dict[str, Any]] | None:
    steps = self.steps()
    for step in reversed(steps):
      mismatch = self._mismatch(step, template)
      if mismatch is not None:  # a readable checkpoint of another run: never moved aside, even with fallback
        raise CheckpointError(
            f"Checkpoint {self.step_path(step)} was written for a different model, optimizer or number of devices "
            f"(or by a jdist version that laid the state out otherwise): {mismatch}. "
            f"Nothing was moved or overwritten. Resume with the configuration that wrote it, or give this run "
            f"its own checkpoint directory (CLI: --set run_dir=...).")
      try:
        state, meta = self._restore(step, template)
      except Exception as e:  # orbax, tensorstore and our own checks raise many types
        failed[0] = True
        reason = _reason(e)
        if not self.config.fallback:
          raise CheckpointError(
              f"Checkpoint {self.step_path(step)} cannot be read ({reason}). Nothing was overwritten. Move it "
              f"away or delete it, or allow resuming from the previous checkpoint with fallback=True "
              f"(CLI: --set checkpoint.fallback=true).") from None
        self._quarantine(step, reason)
        continue
      # the same shapes, the layers in another order: refuse, never scramble (a checkpoint older than the record
      # has none; a circular one of then had other shapes, which the restore already refused)
      saved = meta.get("layer_layout")
      describe = lambda x: "the model's order" if x is None else ", ".join(f"{k}={v}" for k, v in x.items())
      if "layer_layout" in meta and self.layer_layout is _NOT_GIVEN and saved is not None:
        raise CheckpointError(
            f"Checkpoint {self.step_path(step)} keeps the stacked layers in a circular pipeline's order "
            f"({describe(saved)}), and this Checkpointer was not told the order of the state it restores into. "
            f"Nothing was moved or overwritten. Pass Checkpointer(config, layer_layout=strategy.info['layer_layout']) "
            f"for the strategy that restores it (jdist.fit does).")
      if "layer_layout" in meta and self.layer_layout is not _NOT_GIVEN and saved != self.layer_layout:
        raise CheckpointError(
            f"Checkpoint {self.step_path(step)} keeps the stacked layers in another order ({describe(saved)}) than "
            f"this run ({describe(self.layer_layout)}): a circular pipeline stores each device's layers together. "
            f"Nothing was moved or overwritten. Resume with the schedule, pipe size and repeats that wrote it; to "
            f"change them, convert the parameters with unstack_params (from jdist.strategies.pipeline import "
            f"unstack_params) and start a new run.")
      return step, state, _caller_meta(meta)
    if steps:
      raise CheckpointError(f"None of the checkpoints in {self.directory} ({steps}) can be read; they were moved "
                            f"to {self.directory / 'unreadable'}. Nothing was overwritten.")
    return None

  def _mismatch(self, step: int, template: PyTree) -> str | None:
    """How the state saved at ``step`` differs from ``template`` in its leaves' paths, shapes and dtypes, by
    the checkpoint's own metadata; None if they agree, or if the metadata cannot be read (the restore then
    reports what is wrong with the checkpoint)."""
    try:
      saved_tree = self._manager.item_metadata(step)["state"].tree
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint, left to the restore
      return None
    saved = _leaf_types(saved_tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    wanted = _leaf_types(template)
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
      parts = ([f"it lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + (
          [f"it has {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} that this run does not"] if extra else [])
      return "; ".join(parts)
    for path, (shape, dtype) in sorted(wanted.items(), key=lambda kv: (not kv[0].startswith("params"), kv[0])):
      if saved[path] != (shape, dtype):
        there = saved[path][0]
        text = f"{path} is {saved[path][1]}{list(there)} there and {dtype}{list(shape)} here"
        if path.startswith("extra/") and shape and len(there) == len(shape) and there[1:] == shape[1:]:
          text += (f": state kept per device of the data axis (compression residuals, local SGD's replicas) or per "
                   f"async worker has one row each, and that checkpoint has {there[0]}, this run {shape[0]}. Resume "
                   f"it with {there[0]} (the count it was written with)")
        return text
    return None

  def _quarantine(self, step: int, reason: str) -> None:
    """Moves an unreadable checkpoint aside (never deletes it) so that newer saves do not collide."""
    from jdist.distributed import barrier

    target = self.directory / "unreadable" / f"{step}-{int(time.time())}"
    barrier(f"jdist_quarantine_{step}_enter")  # every process has finished reading it
    if jax.process_index() == 0:
      target.parent.mkdir(exist_ok=True)
      shutil.move(str(self.step_path(step)), str(target))
      (target / "REASON.txt").write_text(reason + "\n")
      print(f"jdist: checkpoint step {step} cannot be read ({reason}); moved to {target}, falling back.")
    barrier(f"jdist_quarantine_{step}_moved")  # nobody reloads before it has moved
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
