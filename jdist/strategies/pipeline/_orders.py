"""Each device's order of ops for the interleaved and zero-bubble schedules, and the ticks they run at.

An op is ``(kind, micro-batch i, virtual stage j)``, kind "F" (forward), "B" (backward: the input gradient,
and the weight gradient too unless the schedule has W ops) or "W" (weight gradient). A schedule is first
an order per device, as the papers and PyTorch's ``torch.distributed.pipelining`` define it; ``timed``
then places each op at the first tick its device is free and its inputs exist (one tick per op, a
hand-off arriving the next tick), which gives the tick-by-device table. A device's order alone fixes how
many micro-batches it holds at once; the ticks fix the bubble.
"""
from __future__ import annotations

import numpy as np

from jdist.errors import OptionError

FORWARD, BACKWARD, WEIGHT = "F", "B", "W"
Op = tuple[str, int, int]


def round_size(p: int, m: int, v: int) -> int:
  """Micro-batches per round of an interleaved schedule: p, or m when m < p (PyTorch's relaxation of
  Megatron's "m must be a multiple of p": rounds = max(1, m // p) must divide m); any m when v = 1."""
  rounds = max(1, m // p) if v > 1 else 1
  if m % rounds:
    raise OptionError("microbatches", m, f"a multiple of {rounds} (the rounds of {p} micro-batches) for an "
                      f"interleaved schedule on {p} devices", f"Use e.g. microbatches={rounds * p}.")
  return m // rounds


def _nth(k: int, g: int, v: int, p: int, d: int, *, forward: bool) -> tuple[int, int]:
  """(micro-batch, virtual stage) of device d's k-th forward (or backward): micro-batches go in rounds of
  g, each round through the device's v stages in turn (forwards in stage order, backwards reversed)."""
  lap = (k // g) % v
  return (k // (g * v)) * g + k % g, (lap if forward else v - 1 - lap) * p + d


def interleaved_orders(p: int, m: int, v: int) -> list[list[Op]]:
  """Megatron's interleaved 1F1B (Narayanan et al., "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", SC 2021, section 2.2.2): "each device is assigned multiple subsets of
  layers (called a model chunk)" (here v virtual stages; stage j on device j mod p), and "the pipeline
  bubble time ... reduces to (p-1)(t_f+t_b)/v". Device d first runs (v-1) g + 2(p-1-d) warm-up forwards
  (g = ``round_size``; capped at m v), then one forward and one backward in turn, then the remaining
  backwards: its peak holding is warm-up + 1 virtual stages' inputs (11 9 7 5 for p=4, m=8, v=2, as
  PyTorch's ``ScheduleInterleaved1F1B``)."""
  g, orders = round_size(p, m, v), []
  for d in range(p):
    fwd = [(FORWARD, *_nth(k, g, v, p, d, forward=True)) for k in range(m * v)]
    bwd = [(BACKWARD, *_nth(k, g, v, p, d, forward=False)) for k in range(m * v)]
    warm = min((v - 1) * g + 2 * (p - 1 - d), m * v)
    steady = [op for k in range(m * v - warm) for op in (fwd[warm + k], bwd[k])]
    orders.append(fwd[:warm] + steady + bwd[m * v - warm:])
  return orders


def zb_h1_orders(p: int, m: int, v: int = 1) -> list[list[Op]]:
  """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 2.1; with v > 1 the
  interleaved "ZB1P" of PyTorch's ``ScheduleInterleavedZeroBubble``). The backward is split in B (input
  gradient) and W (weight gradient): "only B passes are on the critical path", W of a micro-batch may run
  any time after its B. ZB-H1 keeps 1F1B's order with one fewer warm-up forward per hop (device d runs
  (v-1) g + p-1-d of them), and delays the W passes: device d runs its first d steady steps as F B only,
  then F B W, so every device holds p micro-batches, 1F1B's peak on the first device; the delayed W fill
  the drain's bubble. With F, B and W one tick each the bubble is (p-1) ticks of 3 m v + p - 1 (1F1B's
  is 3(p-1) of 3(m + p - 1)): a third."""
  g, orders = round_size(p, m, v), []
  for d in range(p):
    fwd = [(FORWARD, *_nth(k, g, v, p, d, forward=True)) for k in range(m * v)]
    bwd = [_nth(k, g, v, p, d, forward=False) for k in range(m * v)]
    warm = min((v - 1) * g + p - 1 - d, m * v)
    ops, w_done = fwd[:warm], 0
    for k in range(m * v):
      ops += fwd[warm + k:warm + k + 1] + [(BACKWARD, *bwd[k])]
      if k >= d:
        ops.append((WEIGHT, *bwd[w_done]))
        w_done += 1
    orders.append(ops + [(WEIGHT, *b) for b in bwd[w_done:]])
  return orders


def zbv_orders(p: int, m: int) -> list[list[Op]]:
  """ZB-V (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024; the "ZBV" of the
  zero-bubble repository and PyTorch's ``ScheduleZBVZeroBubble``): "each device is assigned to exactly 2
  chunks (virtual stages) ... the sequence of dependencies among model chunks follows a 'V' shape pattern
  for both the forward and backward passes": stage j < p on device j, stage j >= p on device 2p - 1 - j,
  so the first device holds the first and the last stage and the turn at the bottom of the V is local.
  Device d: 2(p-d)-1 forwards of its first chunk, d pairs (second chunk, first chunk), p-d triples F B W
  of its second chunk, then F B W of each chunk in turn until every forward ran, then the remaining B
  (d pairs, then p-d with the first chunk's W), then the remaining W. Written for at least 2p-1
  micro-batches; with fewer, the ops of the missing ones are dropped. Same peak as 1F1B (2p chunk inputs,
  each half a device's layers) and, with F, B and W one tick each, a bubble of about p-1 ticks."""
  n, orders = max(2 * p - 1, m), []
  for d in range(p):
    chunks, ops = (d, 2 * p - 1 - d), []
    count = {(kind, c): 0 for kind in (FORWARD, BACKWARD, WEIGHT) for c in (0, 1)}

    def run(*seq):  # ("F", 0) appends chunk 0's next forward, etc.
      for kind, c in seq:
        ops.append((kind, count[kind, c], chunks[c]))
        count[kind, c] += 1

    run(*[(FORWARD, 0)] * (2 * (p - d) - 1))
    run(*[(FORWARD, 1), (FORWARD, 0)] * d)
    run(*[(FORWARD, 1), (BACKWARD, 1), (WEIGHT, 1)] * (p - d))
    while count[FORWARD, 1] < count[FORWARD, 0] or count[FORWARD, 0] < n:
      run(*([(FORWARD, 0)] if count[FORWARD, 0] < n else []), (BACKWARD, 0), (WEIGHT, 0), (FORWARD, 1),
          (BACKWARD, 1), (WEIGHT, 1))
    run(*[(BACKWARD, 0), (BACKWARD, 1)] * d)
    run(*[(BACKWARD, 0), (WEIGHT, 0)] * (p - d))
    run(*[(WEIGHT, 1)] * (count[BACKWARD, 1] - count[WEIGHT, 1]),
        *[(WEIGHT, 0)] * (count[BACKWARD, 0] - count[WEIGHT, 0]))
    orders.append([op for op in ops if op[1] < m])
  return orders


def ready(op: Op, done: dict[Op, int], last: int) -> bool:
  """Whether ``op`` has its inputs, given the ops ``done`` on earlier ticks (``last``: the last virtual stage)."""
  kind, i, j = op
  if kind == FORWARD:
    return j == 0 or (FORWARD, i, j - 1) in done
  if kind == BACKWARD:
    return (FORWARD, i, j) in done and (j == last or (BACKWARD, i, j + 1) in done)
  return (BACKWARD, i, j) in done


def timed(orders: list[list[Op]], stages: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(table, lap, op)``: each device runs its ops in order, each at the first tick after the ops it needs
  (one tick per op; an activation or cotangent sent at tick t can be used from t + 1).

  Args:
    orders: per device, its ops in order. stages: int[p, v], the virtual stage at (device, lap).

  Raises:
    RuntimeError: the orders deadlock (an op waits for one that its device's order puts after it).
  """
  p = len(orders)
  lap_of = {int(j): lap for d in range(p) for lap, j in enumerate(stages[d])}
  done: dict[Op, int] = {}
  pos, rows = [0] * p, []
  last = stages.size - 1
  while any(pos[d] < len(orders[d]) for d in range(p)):
    row = [orders[d][pos[d]] if pos[d] < len(orders[d]) and ready(orders[d][pos[d]], done, last) else None
           for d in range(p)]
    if not any(row):
      waiting = [orders[d][pos[d]] for d in range(p) if pos[d] < len(orders[d])]
      raise RuntimeError(f"The per-device orders deadlock at tick {len(rows)}: {waiting[:4]} wait.")
    for d, op in enumerate(row):
      if op is not None:
        done[op], pos[d] = len(rows), pos[d] + 1
    rows.append(row)
  table = np.array([[-1 if op is None else op[1] for op in row] for row in rows], np.int32).reshape(-1, p)
  lap = np.array([[0 if op is None else lap_of[op[2]] for op in row] for row in rows], np.int32).reshape(-1, p)
  kind = np.array([["." if op is None else op[0] for op in row] for row in rows]).reshape(-1, p)
  return table, lap, kind
