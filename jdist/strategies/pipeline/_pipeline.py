"""Pipeline parallelism: layers on different devices, micro-batches flowing through them.

The model is a stack of identical stages (per-layer parameters stacked on a leading axis, as
``jdist.models.gpt`` keeps its blocks) plus an input function before the first stage and a loss after
the last. Inside ``jax.shard_map`` over the ``pipe`` axis each device holds some of the layers; every
tick each device runs its stage on one micro-batch and hands the activations to the next device with
``ppermute``. ``jax.grad`` of that loop runs the ticks backwards (the reverse ``ppermute`` carries the
activation gradients), which is the GPipe schedule, and accumulates the gradients of every micro-batch.

Schedules (p devices on the pipe axis, m micro-batches, S stacked layers):

- ``gpipe``: device d holds layers [d S/p, (d+1) S/p). Micro-batch i is on device d at tick i + d.
  m + p - 1 ticks; bubble (idle stage-ticks / all) = (p-1)/(m+p-1).
- ``circular`` (interleaved): the layers are cut into p v virtual stages of S/(p v) layers; virtual stage
  j lives on device j mod p, so a micro-batch goes round the ring of devices v times. Micro-batches enter
  in groups of p. m v + p - 1 ticks for m a multiple of p; bubble (p-1)/(m v + p - 1), about v times less.
- ``1f1b`` (PipeDream-Flush, Megatron's non-interleaved one-forward-one-backward): one ``lax.scan`` over
  2(m + p - 1) ticks runs forwards and backwards together. At each tick a device does at most one op from
  a static table: the forward of micro-batch i, the backward of micro-batch j, or nothing; stage s runs
  min(p - s, m) forwards, then a backward and a forward in turn, then the remaining backwards. The
  backward is written by hand: a forward stashes its stage input (one of min(p, m) slots, i mod
  min(p, m)), the backward recomputes the stage under ``jax.vjp`` and applies the cotangent received
  from the next device; the last device starts each backward from ``jax.vjp`` of ``loss_fn`` (its
  forward only stashes), the first ends it with ``jax.vjp`` of ``input_fn``. A device runs forwards on
  ticks of its own parity and backwards on the others, so each tick it sends either an activation on or
  a cotangent back: one ``ppermute`` per tick on every device (pairing neighbours one way on even ticks,
  the other way on odd ones), as many bytes as GPipe's forward and backward sends; ``lax.switch`` on the
  table entry picks the compute. Same bubble as GPipe, (p-1)/(m+p-1); device d holds min(p - d, m) stage
  inputs instead of GPipe's m micro-batches of every layer's activations, so its memory does not grow
  with m. The cost: each stage's forward runs twice (about 4 instead of 3 forward-equivalents of
  compute per micro-batch), and on devices running in parallel a tick lasts as long as its slowest op,
  a backward: in the steady state half the devices run a forward and then wait.

In GPipe and circular every device runs its stage every tick (SPMD); an idle tick's output is dropped and
its gradient gated to exact zeros, so the bubble is wasted compute, exactly what the schedule table
predicts (the input function and the loss run only where needed). The weights stay loop constants: the
backward pass keeps activations per tick, not copies of the weights. In 1F1B idle devices skip the
compute and only take part in the ``ppermute``. ``pipeline_schedule`` returns the table.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist import _checks as checks
from jdist import batches as batch_lib
from jdist import mesh as mesh_lib
from jdist._checks import (
  check_callable,
  check_optimizer,
  check_params,
  check_positive_int,
)
from jdist._types import Batch, Params, PRNGKey
from jdist.state import TrainState
from jdist.strategy import (
  StepFn,
  Strategy,
  loss_and_aux,
  metrics_from,
  optimizer_update,
  pin_layout,
  sharded_state,
)

SCHEDULES = ("gpipe", "circular", "1f1b")
_IDLE, _FORWARD, _STASH, _BACKWARD = range(4)  # 1F1B ops; _STASH: a forward on the last device, which only stashes


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which micro-batch each device works on at each tick.

  Attributes:
    table: int[T, p]: the micro-batch device d works on at tick t, or -1 when idle.
    lap: int[T, p]: which of the device's v virtual stages it runs (0 for GPipe and 1F1B).
    num_stages: p, devices on the pipe axis; repeats: v; microbatches: m.
    backward: bool[T, p] for "1f1b": the cell is the micro-batch's backward (else its forward). None for
      "gpipe" and "circular", whose tables list the forward ticks only: ``jax.grad`` runs as many backward
      ticks after them, in reverse.
    name: the schedule, "gpipe", "circular" or "1f1b".
  """

  table: np.ndarray
  lap: np.ndarray
  num_stages: int
  repeats: int
  microbatches: int
  backward: np.ndarray | None = None
  name: str = "gpipe"

  @property
  def ticks(self) -> int:
    """Rows of the table: forward ticks for "gpipe" and "circular", forward and backward ticks for "1f1b"."""
    return self.table.shape[0]

  @property
  def bubble(self) -> float:
    """Idle stage-ticks over all stage-ticks."""
    return float(np.mean(self.table < 0))

  @property
  def peak_stash(self) -> np.ndarray:
    """int[p]: the most micro-batches whose activations device d holds at once for their backward.

    GPipe and circular keep every forward's until the backward starts: m v per device. 1F1B stashes a
    micro-batch's stage input from its forward to its backward: at most min(p - d, m) on device d.
    """
    if self.backward is None:
      return (self.table >= 0).sum(axis=0)
    change = np.where(self.table < 0, 0, np.where(self.backward, -1, 1))
    # a micro-batch is held from its forward tick through its backward tick, both included
    held = np.cumsum(change, axis=0) - np.minimum(change, 0)
    return held.max(axis=0)

  def expected_bubble(self) -> float:
    """The textbook figure (p-1)/(m v + p - 1); exact for GPipe and 1F1B, and for circular when p divides m."""
    p, v, m = self.num_stages, self.repeats, self.microbatches
    return (p - 1) / (m * v + p - 1)

  def format(self) -> str:
    """The tick-by-device table as text: ``3.1`` is micro-batch 3 on its second lap, ``F3`` / ``B3`` its
    forward / backward (1F1B), ``.`` is idle."""
    width = max(4, len(str(self.microbatches)) + (2 if self.repeats > 1 else 0) + (self.backward is not None) + 1)
    head = "tick " + "".join(f"{'dev ' + str(d):>{width + 2}}" for d in range(self.num_stages))
    rows = [head]
    for t in range(self.ticks):
      cells = []
      for d in range(self.num_stages):
        i = self.table[t, d]
        if i < 0:
          cell = "."
        elif self.backward is not None:
          cell = f"{'B' if self.backward[t, d] else 'F'}{i}"
        else:
          cell = f"{i}.{self.lap[t, d]}" if self.repeats > 1 else str(i)
        cells.append(f"{cell:>{width + 2}}")
      rows.append(f"{t:>4} " + "".join(cells))
    rows.append(f"bubble: {self.bubble:.3f} idle (textbook (p-1)/(m v+p-1) = {self.expected_bubble():.3f})")
    rows.append("peak stash: " + " ".join(map(str, self.peak_stash)) + " stage inputs held per device for the backward")
    return "\n".join(rows)

  def __str__(self) -> str:  # print(schedule) shows the table
    return self.format()


def _zero_sums(tree_type: Any, vary: Callable) -> Any:
  """Zeros to sum values typed like ``tree_type`` into (float32 or wider), marked varying by ``vary``."""
  return jax.tree.map(lambda a: vary(jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32))), tree_type)


def pipeline_schedule(num_stages: int, microbatches: int, schedule: str = "gpipe", *, repeats: int | None = None) -> Schedule:
  """The schedule ``pipeline`` runs: for p = ``num_stages`` devices and m micro-batches.

  GPipe and circular: device d at tick t works on item k = t - d. Items come in groups of p v; within a
  group, position u = k mod (p v) means lap u // p of micro-batch (group) p + u mod p. GPipe is v = 1.
  1F1B: forward of micro-batch i on device s at tick 2i + s, its backward at tick 2i + 2p - 1 - s (the
  module docstring says why).

  Args:
    num_stages: p, the devices on the pipe axis.
    microbatches: m.
    schedule: "gpipe", "circular" or "1f1b".
    repeats: v, the virtual stages per device for "circular" (default 2); must be 1 for "gpipe" and "1f1b".
  """
  p = check_positive_int(num_stages, "num_stages")
  m = check_positive_int(microbatches, "microbatches")
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule: {schedule!r}. It needs to be one of {list(SCHEDULES)}.")
  if schedule != "circular" and repeats not in (None, 1):
    raise ValueError(f"schedule={schedule!r} runs one stage per device (repeats=1), got repeats={repeats}; "
                     f"virtual stages need schedule='circular'.")
  if schedule == "1f1b":
    return _one_forward_one_backward(p, m)
  v = 1 if schedule == "gpipe" else check_positive_int(2 if repeats is None else repeats, "repeats")
  group = p * v
  items = math.ceil(m / p) * group
  ticks = items + p - 1
  table = -np.ones((ticks, p), np.int32)
  lap = np.zeros((ticks, p), np.int32)
  for t in range(ticks):
    for d in range(p):
      k = t - d
      if 0 <= k < items:
        g, u = divmod(k, group)
        i = g * p + u % p
        if i < m:
          table[t, d], lap[t, d] = i, u // p
  # trailing ticks where every device is idle (a last, partial group) are not run
  last = int(np.max(np.nonzero((table >= 0).any(axis=1)))) + 1
  return Schedule(table[:last], lap[:last], p, v, m, name=schedule)


def _one_forward_one_backward(p: int, m: int) -> Schedule:
  """The 1F1B table (PipeDream-Flush, Megatron's non-interleaved schedule) for p stages, m micro-batches.

  Every hand-off takes exactly one tick, so each device needs one receive register per direction and
  nothing else in flight: the last stage alternates forward and backward from the tick micro-batch 0
  reaches it (F(i, p-1) = p - 1 + 2i, B(i, p-1) = p + 2i); the forward chain fixes F(i, s) = 2i + s and
  the backward chain B(i, s) = 2i + 2p - 1 - s. A forward and a backward on one device never collide (their
  ticks differ in parity), and each stage runs the 1F1B order: min(p - s, m) forwards (Megatron's
  min(p - s - 1, m) warm-up and the first steady one), then one backward, one forward, ..., then the
  remaining backwards. 2(m + p - 1) ticks in all, 2m of them busy on every device: the bubble is GPipe's
  (p-1)/(m+p-1). A greedy list schedule would run the warm-up forwards back to back instead, as soon as
  their inputs exist; the receivers would then need a queue for activations that arrive early.

  The replay below checks the dependencies: F(i, s) uses the activation F(i, s-1) sent the tick before,
  B(i, s) the cotangent B(i, s+1) sent the tick before, B(i, p-1) comes after F(i, p-1), and micro-batch
  i's stash slot (i mod min(p, m)) is free when its forward writes it.
  """
  ticks = 2 * (m + p - 1)
  table = -np.ones((ticks, p), np.int32)
  backward = np.zeros((ticks, p), bool)
  for i in range(m):
    for s in range(p):
      for t, bwd in ((2 * i + s, False), (2 * i + 2 * p - 1 - s, True)):
        if table[t, s] >= 0:
          raise RuntimeError(f"1F1B table: two ops on device {s} at tick {t}")  # unreachable (parity)
        table[t, s], backward[t, s] = i, bwd
  slots = min(p, m)
  stash = -np.ones((p, slots), np.int32)  # the micro-batch in each device's stash slot
  sent_act, sent_cot = {}, {}  # (receiving device) -> micro-batch sent at the previous tick
  for t in range(ticks):
    got_act, got_cot, sent_act, sent_cot = sent_act, sent_cot, {}, {}
    for s in range(p):
      i = int(table[t, s])
      if i < 0:
        continue
      if not backward[t, s]:
        ok = (s == 0 or got_act.get(s) == i) and stash[s, i % slots] < 0
        stash[s, i % slots] = i
        if s < p - 1:
          sent_act[s + 1] = i
      else:
        ok = stash[s, i % slots] == i and (s == p - 1 or got_cot.get(s) == i)
        stash[s, i % slots] = -1
        if s > 0:
          sent_cot[s - 1] = i
      if not ok:
        raise RuntimeError(f"1F1B table breaks a dependency at tick {t}, device {s}, micro-batch {i}")
  return Schedule(table, np.zeros_like(table), p, 1, m, backward=backward, name="1f1b")


def pipeline(
    stage_fn: Callable[[Params, jax.Array], jax.Array],
    loss_fn: Callable[[Params, jax.Array, Batch], jax.Array],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis: str = "pipe",
    microbatches: int = 1,
    schedule: str = "gpipe",
    repeats: int | None = None,
    data_axis: str | None = None,
    input_fn: Callable[[Params, Batch], jax.Array] | None = None,
    has_aux: bool = False,
) -> Strategy:
  """Pipeline-parallel training of a stack of identical stages.

  ``params`` (given to ``init``) must be a dict with key ``"stages"``: a pytree whose leaves all have the
  same leading size S (one slice per layer). Other keys (embeddings, heads) are replicated. The state
  keeps every leaf's shape, [S, ...], split over the pipe devices on its leading axis, so the optimizer
  sees the parameters as on one device: shape-aware optimizers (adafactor's factored moments, muon's
  matrices, masks on ``x.ndim``) train as they do there. GPipe and 1F1B keep the layers in order (device
  d holds the d-th block); "circular" stores them device by device (each device's virtual stages
  together), a permutation of the layer axis that ``unstack_params(params, strategy.info["schedule"])``
  undoes; ``strategy.info["layer_layout"]`` names it, and ``jdist.fit`` (or a ``Checkpointer`` given it as
  ``layer_layout``) refuses to resume a checkpoint written with another one.

  Args:
    stage_fn: ``stage_fn(layer_params, x) -> x`` for ONE layer (x keeps its shape: [mb, ...]).
    loss_fn: ``loss_fn(params, y, batch) -> scalar``, the mean loss of a micro-batch from the last
      layer's output ``y``.
    optimizer: any optax optimizer.
    mesh: a mesh with ``axis`` (and ``data_axis`` if given).
    microbatches: m; each device's batch is split into m equal micro-batches.
    schedule: "gpipe", "circular" or "1f1b"; ``repeats`` is v for "circular" (default 2).
    data_axis: also split the batch over this axis (data x pipe meshes). Without it the batch is
      replicated over the mesh (only the first and last pipe devices read it).
    input_fn: ``input_fn(params, batch) -> x`` before the first layer (default ``batch["x"]``).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux (a pytree of scalars) is averaged over the
      micro-batches and data replicas, like the loss, and reported with the metrics.

  Returns:
    A ``Strategy``. Metrics: ``loss``, ``grad_norm``, ``bubble`` (idle stage-ticks / all, counted from
    the schedule the step ran) and ``ticks`` (rows of the schedule's table: forward ticks for "gpipe" and
    "circular", forward and backward ticks for "1f1b"); ``info["schedule"]`` is that ``Schedule``.
    ``shard_batch`` takes the global batch in one process and this process's share in a multi-process run
    (as ``jdist.batches.put_batch``); with ``data_axis`` outermost, e.g. ``make_mesh(data=2, pipe=4)`` on 2
    processes, each process's devices need only its share, otherwise the shares are first gathered on
    every host (``put_batch(..., gather=True)``).
  """
  check_callable(stage_fn, "stage_fn")
  check_callable(loss_fn, "loss_fn")
  check_optimizer(optimizer)
  axis = checks.check_axis(mesh, axis, who="pipeline", what="pipe axis", example="pipe")
  data_axes = checks.check_axes(mesh, data_axis, what="data axis") if data_axis is not None else ()
  if axis in data_axes:
    raise ValueError(f"data_axis {data_axis!r} includes the pipe axis {axis!r}: the batch is split over other mesh "
                     f"axes than the one the layers are, e.g. jdist.make_mesh(data=2, {axis}=4) with "
                     f"data_axis='data'.")
  checks.check_no_idle_axes(mesh, (axis, *data_axes), who="pipeline", fix="To split the batch over it, name "
                              "it in data_axis")
  p = mesh.shape[axis]
  sched = pipeline_schedule(p, microbatches, schedule, repeats=repeats)
  m, v = sched.microbatches, sched.repeats
  n_data = mesh_lib.axis_size(mesh, data_axes) if data_axes else 1
  input_fn = input_fn or _batch_x
  head = lambda params, y, batch: loss_and_aux(loss_fn(params, y, batch), has_aux)  # (loss, aux or None)
  stage_spec = P(axis)  # stacked layers [S, ...] in device order: each pipe device holds S / p of them
  batch_spec = P(data_axes) if data_axes else P()
  table = jnp.asarray(sched.table)
  laps = jnp.asarray(sched.lap)

  def check_stages(params):
    if not isinstance(params, dict) or "stages" not in params:
      raise ValueError("pipeline params must be a dict with a 'stages' entry holding the stacked per-layer "
                       f"parameters; got {type(params).__name__} with keys "
                       f"{list(params) if isinstance(params, dict) else '-'}.")
    leaves = jax.tree.leaves(params["stages"])
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
      raise ValueError(f"params['stages'] must be stacked: every leaf with the same leading (layer) size; got "
                       f"leading sizes {sorted(map(str, sizes))}. Stack per-layer parameters with "
                       f"jax.tree.map(lambda *x: jnp.stack(x), *layers).")
    (s,) = sizes
    if s % (p * v):
      raise ValueError(f"{s} stacked layers cannot be split into {p} pipeline devices x {v} virtual stages "
                       f"(= {p * v}); use a number of layers divisible by {p * v} or another mesh / repeats.")
    return s

  def activation_type(params, micro_batch):
    """The activations' type after ``input_fn`` (traced, not run), checked to be one array that ``stage_fn``
    returns unchanged in shape and dtype: each stage's output is the next one's input."""
    x = jax.eval_shape(lambda: input_fn(params, micro_batch))
    if not isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(f"input_fn must return one array, the activations [micro-batch, ...], got "
                      f"{jax.tree.structure(x)}: the stages pass a single array from device to device. Pack "
                      f"several into one (e.g. concatenate them on the last axis).")
    layer = jax.tree.map(lambda a: a[0], params["stages"])  # this device's first layer
    y = jax.eval_shape(lambda: stage_fn(layer, jnp.zeros(x.shape, x.dtype)))
    if not isinstance(y, jax.ShapeDtypeStruct) or (y.shape, y.dtype) != (x.shape, x.dtype):
      got = f"{y.dtype}{list(y.shape)}" if isinstance(y, jax.ShapeDtypeStruct) else str(jax.tree.structure(y))
      raise TypeError(f"stage_fn must return the activations in the shape and dtype it was given, "
                      f"{x.dtype}{list(x.shape)} (from input_fn), got {got}: each stage's output is the next "
                      f"one's input. Change the width or dtype in input_fn or loss_fn instead.")
    return x

  def run_stage(local, lap, x):
    # local: this device's layers [v c, ...]; run the c layers of virtual stage `lap` in order. One
    # dynamic_slice (no squeeze after it) so that ``_weights_only`` sees the selection as one weight-only op
    layers = local if v == 1 else jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, lap * (a.shape[0] // v),
                                                                                         a.shape[0] // v, 0), local)
    return jax.lax.scan(lambda h, layer: (stage_fn(layer, h), None), x, layers)[0]

  def local_loss(params, batch):
    # params["stages"]: [v c, ...] this device's layers; other entries whole; batch: [B/n_data, ...]
    d = jax.lax.axis_index(axis)
    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)
    pick = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, jnp.maximum(i, 0), 0, keepdims=False), micro)
    x_shape = activation_type(params, pick(0))

    def add_head(params, y, i, loss, aux):  # the last stage's output of micro-batch i: its loss and aux into the sums
      loss_i, aux_i = head(params, y, pick(i))
      return loss + loss_i.astype(loss.dtype), jax.tree.map(lambda acc, a: acc + a.astype(acc.dtype), aux, aux_i)

    def compute(params, received, i, lap, loss, aux):
      working = i >= 0
      done = working & (d == p - 1) & (lap == v - 1)
      x = jax.lax.cond(working & (d == 0) & (lap == 0), lambda: input_fn(params, pick(i)), lambda: received)
      # Every tick runs the stage (idle ones on whatever arrived) and keeps its output only when working. A
      # stage evaluated on zeros may have an infinite derivative there, and an idle tick's zero cotangent
      # times that is NaN: the gates give the weights and the input exact zeros there (a select, not a
      # product). Not a lax.cond: under jax.grad its saved values are outputs of the loop body (a copy of
      # the weights per tick), and under jax.checkpoint a tick's activations were kept twice. The input and
      # the loss stay under lax.cond: idle devices skip them.
      y = run_stage(_gate(working, params["stages"]), lap, _gate(working, x))
      y = jax.lax.select_n(working, zero_x, y)
      loss, aux = jax.lax.cond(done, add_head, lambda params, y, i, loss, aux: (loss, aux), params, y, i, loss, aux)
      return y, loss, aux

    # jax.checkpoint keeps its inputs (the params, loop constants) as they are, and the policy recomputes
    # what depends on the weights alone (the lap's slice, the gated weights, casts) in the backward instead
    # of saving it once per tick (m v + p - 1 copies); activations are saved as without it.
    compute = jax.checkpoint(compute, policy=_weights_only(params, v), prevent_cse=False)

    def tick(carry, t):
      received, loss, aux, active = carry
      i, lap = table[t, d], laps[t, d]
      y, loss, aux = compute(params, received, i, lap, loss, aux)
      sent = jax.lax.ppermute(y, axis, [(j, (j + 1) % p) for j in range(p)])
      return (sent, loss, aux, active + (i >= 0).astype(jnp.int32)), None

    all_axes = (axis,) + tuple(data_axes)
    varying = lambda x: jax.lax.pcast(x, all_axes, to="varying")
    zero_x = varying(jnp.zeros(x_shape.shape, x_shape.dtype))
    zero_aux = _zero_sums(jax.eval_shape(lambda: head(params, zero_x, pick(0))[1]), varying)
    init = (zero_x, varying(jnp.zeros(())), zero_aux, varying(jnp.zeros((), jnp.int32)))
    (_, loss, aux, active), _ = jax.lax.scan(tick, init, jnp.arange(sched.ticks))
    return loss / m, (active, jax.tree.map(lambda a: a / m, aux))

  if schedule == "1f1b":  # what each device does at each tick; micro-batch i's stage input waits in slot i % slots
    ops = np.where(sched.table < 0, _IDLE, np.where(sched.backward, _BACKWARD, _FORWARD))
    ops[:, p - 1] = np.where(ops[:, p - 1] == _FORWARD, _STASH, ops[:, p - 1])  # its output would go nowhere
    ops, which = jnp.asarray(ops, jnp.int32), jnp.asarray(np.maximum(sched.table, 0))
    slots = int(sched.peak_stash.max())  # min(p, m)
    # At tick t device s runs forwards only if s = t (mod 2) and backwards only if not (forward of i at
    # 2i + s, backward at 2i + 2p - 1 - s), so at each tick a device sends either an activation to s + 1
    # or a cotangent to s - 1: one ppermute per tick, pairing the devices one way on even ticks and the
    # other way on odd ones.
    busy = sched.table >= 0
    parity = (np.arange(sched.ticks)[:, None] - np.arange(p)[None, :]) % 2
    if not np.all(parity[busy] == sched.backward[busy]):
      raise RuntimeError("1F1B table: a forward or backward at a tick of the wrong parity")  # unreachable
    sends = [[(s, s + 1) if s % 2 == t else (s, s - 1) for s in range(p) if (s + 1 < p if s % 2 == t else s > 0)]
             for t in (0, 1)]

  def one_forward_one_backward(params, batch):
    """Loss (on the last device, / m), gradients (summed over micro-batches, this device's share) and busy
    ticks, with a hand-written backward: each stage's forward is recomputed under ``jax.vjp`` at its B tick."""
    # params: varying over every mesh axis; params["stages"]: [1, c, ...] this device's layers
    d = jax.lax.axis_index(axis)
    all_axes = (axis,) + tuple(data_axes)

    # a fresh constant typed like the values the pipeline computes (varying over every axis), for cond / scan
    varying = lambda x: jax.lax.pcast(x, all_axes, to="varying")

    micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)
    pick = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), micro)
    x_type = activation_type(params, pick(0))
    zeros_x = varying(jnp.zeros(x_type.shape, x_type.dtype))  # x: [mb, ...]
    zero_grads = jax.tree.map(lambda x: varying(jnp.zeros(x.shape, x.dtype)), params)
    loss_type, aux_type = jax.eval_shape(lambda: head(params, zeros_x, pick(0)))
    zero_loss = varying(jnp.zeros((), jnp.float32))
    zero_aux = _zero_sums(aux_type, varying)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    run = lambda stages, x: run_stage(stages, 0, x)

    def tick(carry, t, perm):
      received, stash, grads, loss, aux, active = carry  # stash: [slots, mb, ...]
      op, i = ops[t, d], which[t, d]
      slot = i % slots
      stashed = jax.lax.dynamic_index_in_dim(stash, slot, 0, keepdims=False)
      # what arrived last tick: an activation from d - 1 if this tick is a forward, else a cotangent from d + 1
      stage_input = lambda: jax.lax.cond(d == 0, lambda: input_fn(params, pick(i)), lambda: received)

      # each branch: (what to send: an activation on or a cotangent back, the stash slot's new content,
      # the gradient, loss and aux sums); only a backward adds to the sums
      def idle():
        return zeros_x, stashed, grads, loss, aux

      def forward():
        x = stage_input()
        return run(params["stages"], x), x, grads, loss, aux

      def stash_only():
        return zeros_x, stage_input(), grads, loss, aux

      def backward():
        y, stage_vjp = jax.vjp(run, params["stages"], stashed)

        def from_loss():  # last device: d(loss_i / m) / dy, and the loss's own parameter gradients
          loss_i, loss_vjp, aux_i = jax.vjp(lambda prm, y: head(prm, y, pick(i)), params, y, has_aux=True)
          g_params, g_y = loss_vjp(varying(jnp.full(loss_type.shape, 1 / m, loss_type.dtype)))
          new_aux = jax.tree.map(lambda acc, a: acc + a.astype(acc.dtype), aux, aux_i)
          return loss + loss_i.astype(jnp.float32), new_aux, g_y, add(grads, g_params)

        new_loss, new_aux, g_y, new_grads = jax.lax.cond(d == p - 1, from_loss,
                                                         lambda: (loss, aux, received, grads))
        g_stages, g_x = stage_vjp(g_y)

        def into_input(acc):  # first device: the input function's parameter gradients (e.g. the embedding)
          return add(acc, jax.vjp(lambda prm: input_fn(prm, pick(i)), params)[1](g_x)[0])

        new_grads = jax.lax.cond(d == 0, into_input, lambda acc: acc, new_grads)
        new_grads = dict(new_grads, stages=add(new_grads["stages"], g_stages))
        return g_x, stashed, new_grads, new_loss, new_aux

      send, slot_value, grads, loss, aux = jax.lax.switch(op, [idle, forward, stash_only, backward])
      stash = jax.lax.dynamic_update_index_in_dim(stash, slot_value, slot, 0)
      # one ppermute per tick on every device (zeros when it has nothing), outside the branches
      if p > 1:
        received = jax.lax.ppermute(send, axis, perm)
      return received, stash, grads, loss, aux, active + (op != _IDLE).astype(jnp.int32)

    def two_ticks(carry, j):  # the ticks alternate between the two send patterns
      carry = tick(carry, 2 * j, sends[0])
      return tick(carry, 2 * j + 1, sends[1]), None

    stash = varying(jnp.zeros((slots, *x_type.shape), x_type.dtype))
    init = (zeros_x, stash, zero_grads, zero_loss, zero_aux, varying(jnp.zeros((), jnp.int32)))
    (_, _, grads, loss, aux, active), _ = jax.lax.scan(two_ticks, init, jnp.arange(sched.ticks // 2))
    return loss / m, jax.tree.map(lambda a: a / m, aux), grads, active

  def local_grads(params, batch):
    # params["stages"]: this device's S / p layers [v c, ...], its v virtual stages of c layers
    vary = lambda x, axes: jax.lax.pcast(x, axes, to="varying") if axes else x
    pipe_and_data = (axis,) + tuple(data_axes)
    params = {k: (jax.tree.map(lambda x: vary(x, tuple(data_axes)), val) if k == "stages" else
                  jax.tree.map(lambda x: vary(x, pipe_and_data), val)) for k, val in params.items()}
    if schedule == "1f1b":
      loss, aux, grads, active = one_forward_one_backward(params, batch)
    else:
      (loss, (active, aux)), grads = jax.value_and_grad(local_loss, has_aux=True)(params, batch)
    # the loss and aux live on the last device only: sum over the pipe; average over data replicas
    loss, aux = jax.lax.psum((loss, aux), axis)
    grads = {k: (val if k == "stages" else jax.lax.psum(val, axis)) for k, val in grads.items()}
    if data_axes:
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), data_axes)
    idle = p * sched.ticks - jax.lax.psum(active, axis)
    if data_axes:
      idle = jax.lax.pmean(idle, data_axes)
    return loss, aux, grads, idle

  def specs_of(params):
    return {k: (jax.tree.map(lambda _: stage_spec, val) if k == "stages" else jax.tree.map(lambda _: P(), val))
            for k, val in params.items()}

  def shardings_of(params):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(params), is_leaf=lambda x: isinstance(x, P))

  def init(params: Params, *, key: PRNGKey | int | None = None) -> TrainState:
    params = check_params(params)
    check_stages(params)
    params = dict(params, stages=_to_devices(params["stages"], p, v))
    return sharded_state(params, shardings_of(params), optimizer, mesh, key)

  def check_batch(batch):
    batch_lib.batch_size(batch, multiple_of=n_data * m, what="batch")

  def shard_batch(batch: Batch) -> Batch:
    # one process: the global batch; several: this process's share (gathered on every host first when the
    # pipe axis spans the processes)
    try:
      return batch_lib.put_batch(batch, NamedSharding(mesh, batch_spec), multiple_of=n_data * m, gather=True)
    except ValueError as e:
      raise ValueError(f"{e} (the batch is split over {n_data} data replica(s), then into {m} micro-batches)") from None

  def step_fn(state: TrainState, batch: Batch):
    check_batch(batch)
    specs = specs_of(state.params)
    body = jax.shard_map(local_grads, mesh=mesh, in_specs=(specs, batch_spec), out_specs=(P(), P(), specs, P()))
    loss, aux, grads, idle = body(state.params, batch)
    updates, opt_state = optimizer_update(optimizer, grads, state.opt_state, state.params, loss)
    params, opt_state = pin_layout(optax.apply_updates(state.params, updates), opt_state,
                                   shardings_of(state.params), optimizer, mesh)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics_from(loss, grads, aux, new_state.step, bubble=idle / (p * sched.ticks),
                                   ticks=jnp.float32(sched.ticks))

  step = StepFn(step_fn, mesh, donate_argnums=0)
  # "circular" orders the layer axis by device (``device_layer_order``): jdist.fit records it with each
  # checkpoint and refuses to resume one laid out otherwise (same shapes, other layers)
  layout = {"schedule": "circular", "pipe": p, "repeats": v} if v > 1 and p > 1 else None  # else: model order
  strategy = Strategy(init=init, shard_batch=shard_batch, step=step, name=f"pipeline[{schedule}, p={p}, m={m}]",
                      mesh=mesh, info={"schedule": sched, "layer_layout": layout})
  return strategy


def _gate(working: jax.Array, tree: Any) -> Any:
  """``tree`` unchanged; its cotangent passes where ``working`` and is exactly zero elsewhere (NaN included)."""
  return jax.tree.map(lambda a: jax.lax.select_n(working, jax.lax.stop_gradient(a), a), tree)


def _weights_only(params: Params, v: int) -> Callable[..., bool]:
  """A ``jax.checkpoint`` policy that saves every value except those computed from the parameters alone.

  An operation whose array operands all have the shape of a parameter (this device's layers [v c, ...],
  a virtual stage's [c, ...], a layer's [...], or another entry of ``params``), in any dtype, is taken to
  compute from weights alone (the lap's slice, the gated weights, a cast to the compute dtype, a
  transpose): the backward recomputes it from the weights, which stay loop constants, rather than keep
  it once per tick. An activation of such a shape is recomputed too: compute, never correctness.
  """
  shapes = set()
  for name, tree in params.items():
    for a in jax.tree.leaves(tree):
      shapes.add(a.shape)
      if name == "stages":
        shapes.update({a.shape[1:], (a.shape[0] // v, *a.shape[1:])})

  def saveable(prim, *avals, **params) -> bool:
    return not all(a.shape in shapes for a in avals if getattr(a, "shape", ()))

  return saveable


def device_layer_order(num_layers: int, num_stages: int, repeats: int) -> np.ndarray:
  """``order[k]``: the layer the pipeline state keeps at position k of its layer axis.

  Device d holds positions [d S/p, (d+1) S/p): its v virtual stages of c = S/(p v) layers, virtual stage
  j of the model (layers [j c, (j+1) c)) on device j mod p. With v = 1 (GPipe, 1F1B) that is the identity.
  """
  p, v = num_stages, repeats
  c = num_layers // (p * v)
  device, lap, layer = np.meshgrid(np.arange(p), np.arange(v), np.arange(c), indexing="ij")
  return ((lap * p + device) * c + layer).reshape(-1)


def _to_devices(stages: Params, p: int, v: int) -> Params:
  if v == 1:
    return stages
  order = device_layer_order(jax.tree.leaves(stages)[0].shape[0], p, v)
  return jax.tree.map(lambda x: x[order], stages)


def unstack_params(params: Params, schedule: Schedule) -> Params:
  """Pipeline params (or a tree laid out like them: gradients, optimizer moments) in the model's layer
  order; ``schedule`` is the strategy's, ``strategy.info["schedule"]``. Only "circular" reorders the layers
  (``device_layer_order``); the shapes are the model's in every schedule."""
  if not isinstance(schedule, Schedule):
    raise TypeError(f"unstack_params needs the pipeline's schedule (strategy.info['schedule']), got "
                    f"{type(schedule).__name__}.")
  if schedule.repeats == 1:
    return params
  order = device_layer_order(jax.tree.leaves(params["stages"])[0].shape[0], schedule.num_stages, schedule.repeats)
  inverse = np.argsort(order)
  return dict(params, stages=jax.tree.map(lambda x: x[inverse], params["stages"]))


def _batch_x(params: Params, batch: Batch) -> jax.Array:
  """The default ``input_fn``: the batch's "x"."""
  if not (isinstance(batch, Mapping) and "x" in batch):
    keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"The default input_fn reads batch['x'], but the batch has {keys}. Pass "
                     f"input_fn=lambda params, batch: ... to make the first stage's input.")
  return batch["x"]
