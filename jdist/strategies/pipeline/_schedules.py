"""Pipeline schedules as tables: which micro-batch each device works on at each tick, and with what op.

Pure numpy: a schedule is data, built and checked here with no devices, and run by an executor
(``_gpipe`` for forward-only tables, whose backward ``jax.grad`` derives; ``_ticks`` for tables
that say where each backward runs).

Cells name an op: ``F`` a micro-batch's forward through a stage, ``B`` its backward (the input gradient,
and the weight gradient too where the table has no ``W``), ``W`` the weight gradient alone (for
schedules that split the backward, as zero-bubble ones do).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from jdist._checks import check_choice, check_positive_int
from jdist.errors import OptionError
from jdist.strategies.pipeline import _orders
from jdist.strategies.pipeline._orders import BACKWARD, FORWARD, WEIGHT

SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv")
IDLE = "."
# virtual stages per device each schedule takes: its default, and whether another value is allowed
REPEATS = {"gpipe": (1, False), "1f1b": (1, False), "circular": (2, True), "interleaved_1f1b": (2, True),
           "zb_h1": (1, True), "zbv": (2, False)}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which micro-batch each device works on at each tick.

  Attributes:
    table: int[T, p]: the micro-batch device d works on at tick t, or -1 when idle.
    lap: int[T, p]: which of the device's v virtual stages it runs (0 for GPipe and 1F1B).
    num_stages: p, devices on the pipe axis; repeats: v; microbatches: m.
    op: str[T, p] of "F", "B", "W" ("." idle) for tables that place the backward; None for "gpipe" and
      "circular", whose tables list the forward ticks only: ``jax.grad`` runs as many backward ticks after
      them, in reverse.
    name: the schedule, one of ``SCHEDULES``.
    stages: int[p, v]: the virtual stage (index in model order) that device d runs on its lap l; None:
      stage l p + d (round-robin; "zbv" places them in a V).
  """

  table: np.ndarray
  lap: np.ndarray
  num_stages: int
  repeats: int
  microbatches: int
  op: np.ndarray | None = None
  name: str = "gpipe"
  stages: np.ndarray | None = None

  @property
  def ticks(self) -> int:
    """Rows of the table: forward ticks for "gpipe" and "circular", all ticks for the others."""
    return self.table.shape[0]

  @property
  def stage_ids(self) -> np.ndarray:
    """int[p, v]: the virtual stage at (device, lap)."""
    if self.stages is not None:
      return self.stages
    return np.arange(self.num_stages * self.repeats).reshape(self.repeats, self.num_stages).T

  @property
  def split_backward(self) -> bool:
    """The table runs each backward as B (input gradient) then W (weight gradient), as zero-bubble ones do."""
    return self.op is not None and bool((self.op == WEIGHT).any())

  @property
  def backward(self) -> np.ndarray | None:
    """bool[T, p]: the cell is a backward ("B"); None for forward-only tables."""
    return None if self.op is None else self.op == BACKWARD

  @property
  def bubble(self) -> float:
    """Idle stage-ticks over all stage-ticks."""
    return float(np.mean(self.table < 0))

  @property
  def peak_stash(self) -> np.ndarray:
    """int[p]: the most micro-batches whose activations device d holds at once for their backward.

    GPipe and circular keep every forward's until the backward starts: m v per device. Elsewhere a
    micro-batch's stage input is held from its forward through its last backward op (B, or W where the
    table has one) on that virtual stage, both ticks included: at most min(p - d, m) on device d in 1F1B.
    Counted per virtual stage (a "zbv" or interleaved device holds stages of S/(p v) layers).
    """
    if self.op is None:
      return (self.table >= 0).sum(axis=0)
    return stash_intervals(self)[1].max(axis=0)

  def expected_bubble(self) -> float:
    """The textbook figure with every op one tick: (p-1)/(m v + p - 1) (GPipe, 1F1B, circular and
    interleaved 1F1B; exact when p divides m), and (p-1)/(3 m v + p - 1) for the split backward."""
    p, v, m = self.num_stages, self.repeats, self.microbatches
    return (p - 1) / ((3 if self.split_backward else 1) * m * v + p - 1)

  def cell(self, t: int, d: int) -> str:
    """One cell of ``format``: "3" (micro-batch 3), "3.1" (on its second lap), "F3" / "B3" / "W3", "." idle."""
    i = self.table[t, d]
    if i < 0:
      return IDLE
    text = f"{'' if self.op is None else self.op[t, d]}{i}"
    return f"{text}.{self.lap[t, d]}" if self.repeats > 1 else text

  def format(self) -> str:
    """The tick-by-device table as text (cells as ``cell`` writes them), the bubble and the peak stash."""
    width = max(4, len(str(self.microbatches)) + (2 if self.repeats > 1 else 0) + (self.op is not None) + 1)
    rows = ["tick " + "".join(f"{'dev ' + str(d):>{width + 2}}" for d in range(self.num_stages))]
    for t in range(self.ticks):
      rows.append(f"{t:>4} " + "".join(f"{self.cell(t, d):>{width + 2}}" for d in range(self.num_stages)))
    formula = "(p-1)/(3mv+p-1)" if self.split_backward else "(p-1)/(mv+p-1)"
    rows.append(f"bubble: {self.bubble:.3f} idle (textbook {formula} = {self.expected_bubble():.3f})")
    rows.append("peak stash: " + " ".join(map(str, self.peak_stash)) + " stage inputs held per device for the backward")
    return "\n".join(rows)

  def __str__(self) -> str:  # print(schedule) shows the table
    return self.format()


def pipeline_schedule(num_stages: int, microbatches: int, schedule: str = "gpipe", *,
                      repeats: int | None = None) -> Schedule:
  """The schedule ``pipeline`` runs: for p = ``num_stages`` devices and m micro-batches.

  Args:
    num_stages: p, the devices on the pipe axis.
    microbatches: m.
    schedule: one of ``SCHEDULES``: "gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv".
    repeats: v, the virtual stages per device: default 2 for "circular" and "interleaved_1f1b", 1 for
      "zb_h1" (v > 1: PyTorch's interleaved zero-bubble ``ScheduleInterleavedZeroBubble``); "gpipe" and
      "1f1b" take 1 only, "zbv" 2 only.

  Raises:
    OptionError: an unknown schedule, a count that is not a positive int, repeats the schedule cannot
      take, or (interleaved and zero-bubble schedules) m > p not a multiple of m // p.
  """
  p = check_positive_int(num_stages, "num_stages")
  m = check_positive_int(microbatches, "microbatches")
  check_choice(schedule, "schedule", SCHEDULES)
  default, free = REPEATS[schedule]
  v = default if repeats is None else check_positive_int(repeats, "repeats")
  if v != default and not free:
    raise OptionError("repeats", repeats, f"{default} for schedule={schedule!r}", "Virtual stages in any number "
                      "need schedule='circular', 'interleaved_1f1b' or 'zb_h1'.")
  if schedule == "1f1b":
    return one_f_one_b(p, m)
  if schedule in ("gpipe", "circular"):
    return dataclasses.replace(gpipe(p, m, v), name=schedule)
  if schedule == "zbv":
    stages = np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1)
    orders = _orders.zbv_orders(p, m)
  else:
    stages = None
    orders = (_orders.interleaved_orders if schedule == "interleaved_1f1b" else _orders.zb_h1_orders)(p, m, v)
  sched = Schedule(np.zeros((0, p), np.int32), np.zeros((0, p), np.int32), p, v, m, name=schedule, stages=stages)
  table, lap, op = _orders.timed(orders, sched.stage_ids)
  sched = dataclasses.replace(sched, table=table, lap=lap, op=op)
  check_dependencies(sched)
  return sched


def gpipe(p: int, m: int, v: int = 1) -> Schedule:
  """The forward ticks of GPipe (v = 1) and of circular GPipe (v virtual stages per device).

  Device d at tick t works on item k = t - d. Items come in groups of p v; within a group, position
  u = k mod (p v) means lap u // p of micro-batch (group) p + u mod p. m v + p - 1 ticks when p divides m.
  """
  group = p * v
  items = math.ceil(m / p) * group
  k = np.arange(items + p - 1)[:, None] - np.arange(p)[None, :]  # the item each device works on
  g, u = np.divmod(k, group)
  micro = g * p + u % p
  busy = (k >= 0) & (k < items) & (micro < m)
  table, lap = np.where(busy, micro, -1).astype(np.int32), np.where(busy, u // p, 0).astype(np.int32)
  # trailing ticks where every device is idle (a last, partial group) are not run
  last = int(np.max(np.nonzero(busy.any(axis=1)))) + 1
  return Schedule(table[:last], lap[:last], p, v, m, name="gpipe" if v == 1 else "circular")


def one_f_one_b(p: int, m: int) -> Schedule:
  """The 1F1B table (PipeDream-Flush, Megatron's non-interleaved schedule) for p stages, m micro-batches.

  Every hand-off takes exactly one tick, so each device needs one receive register per direction and
  nothing else in flight: the last stage alternates forward and backward from the tick micro-batch 0
  reaches it (F(i, p-1) = p - 1 + 2i, B(i, p-1) = p + 2i); the forward chain fixes F(i, s) = 2i + s and
  the backward chain B(i, s) = 2i + 2p - 1 - s. A forward and a backward on one device never collide (their
  ticks differ in parity), and each stage runs the 1F1B order: min(p - s, m) forwards (Megatron's
  min(p - s - 1, m) warm-up and the first steady one), then one backward, one forward, ..., then the
  remaining backwards. 2(m + p - 1) ticks in all, 2m of them busy on every device: the bubble is GPipe's
  (p-1)/(m+p-1). ``_orders.timed`` would run the warm-up forwards back to back instead, as soon as their
  inputs exist: same ticks and bubble, but activations that arrive early wait in the inbox, and a device
  sends both ways on one tick parity (two ``ppermute``s a tick instead of one).
  """
  ticks = 2 * (m + p - 1)
  table = -np.ones((ticks, p), np.int32)
  op = np.full((ticks, p), IDLE)
  i, s = np.meshgrid(np.arange(m), np.arange(p), indexing="ij")
  table[2 * i + s, s], op[2 * i + s, s] = i, FORWARD
  table[2 * i + 2 * p - 1 - s, s], op[2 * i + 2 * p - 1 - s, s] = i, BACKWARD
  sched = Schedule(table, np.zeros_like(table), p, 1, m, op=op, name="1f1b")
  check_dependencies(sched)
  return sched


def op_ticks(schedule: Schedule) -> dict[tuple[str, int, int], list[int]]:
  """``{(op, micro-batch, virtual stage j): [ticks]}`` for a table with ops."""
  found: dict[tuple[str, int, int], list[int]] = {}
  stages = schedule.stage_ids
  for t, d in zip(*np.nonzero(schedule.table >= 0)):
    j = int(stages[d, schedule.lap[t, d]])
    found.setdefault((str(schedule.op[t, d]), int(schedule.table[t, d]), j), []).append(int(t))
  return found


def check_dependencies(schedule: Schedule) -> None:
  """Replays a table with ops and raises if a cell runs before what it needs.

  Each micro-batch runs F and B (and W, if the table has any) once on every virtual stage j; F(i, j) runs
  after F(i, j - 1) (its activation arrives the tick after), B(i, j) after B(i, j + 1) (its cotangent) and
  after F(i, j), and W after the B of the same stage. An input that arrives before its op runs waits in
  the receiving device's buffer (``_ticks.plan`` sizes it).
  """
  p, v, m = schedule.num_stages, schedule.repeats, schedule.microbatches
  when, bad = op_ticks(schedule), []
  has_w = any(k[0] == WEIGHT for k in when)
  for i in range(m):
    for j in range(p * v):
      f, b, w = (when.get((o, i, j), []) for o in (FORWARD, BACKWARD, WEIGHT))
      if len(f) != 1 or len(b) != 1 or len(w) != has_w:
        bad.append(f"micro-batch {i} stage {j}: F at {f}, B at {b}, W at {w}")
        continue
      ok = (j == 0 or when.get((FORWARD, i, j - 1), [f[0]])[0] < f[0]) and b[0] > f[0]
      ok &= j == p * v - 1 or when.get((BACKWARD, i, j + 1), [b[0]])[0] < b[0]
      if not ok or (has_w and w[0] <= b[0]):
        bad.append(f"micro-batch {i} stage {j}: F at {f}, B at {b}, W at {w}")
  if bad or len(when) != (2 + has_w) * m * p * v:
    raise RuntimeError(f"The {schedule.name} table breaks a dependency: {bad[:3] or 'ops of unknown kind'}.")


def allocate(spans: list[tuple[int, int]]) -> tuple[list[int], int]:
  """Buffer slots for values held over tick ``spans`` ``(first, last)`` (both included) on one device: each
  gets the lowest slot free at its first tick. Returns (slot per span, slots used)."""
  slots, until = [-1] * len(spans), []  # until[s]: the last tick slot s is taken
  for k in sorted(range(len(spans)), key=lambda k: spans[k]):
    first, last = spans[k]
    slots[k] = next((s for s, u in enumerate(until) if u < first), len(until))
    until[slots[k]:slots[k] + 1] = [last]
  return slots, len(until)


def stash_intervals(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
  """For a table with ops: ``(slot, held)``. ``slot``: int[T, p], the stash slot of the cell's micro-batch
  (lowest free one at its forward, kept until its last backward op on that virtual stage; -1 for idle
  cells); ``held``: int[T, p], the micro-batches stashed on each device at each tick (both ends included)."""
  ticks, p = schedule.table.shape
  slot, held = -np.ones((ticks, p), np.int32), np.zeros((ticks, p), np.int32)
  spans: dict[int, dict[tuple[int, int], list[int]]] = {d: {} for d in range(p)}  # (i, j) -> [F, last op]
  where = {int(j): d for d, row in enumerate(schedule.stage_ids) for j in row}
  for (o, i, j), ts in op_ticks(schedule).items():
    span = spans[where[j]].setdefault((i, j), [ticks, -1])
    span[0 if o == FORWARD else 1] = min(span[0], *ts) if o == FORWARD else max(span[1], *ts)
  for d in range(p):
    keys = list(spans[d])
    slots, _ = allocate([tuple(spans[d][k]) for k in keys])
    for k, s in zip(keys, slots):
      first, last = spans[d][k]
      held[first:last + 1, d] += 1
      for t in range(first, last + 1):
        if schedule.table[t, d] == k[0] and schedule.stage_ids[d, schedule.lap[t, d]] == k[1]:
          slot[t, d] = s
  return slot, held
