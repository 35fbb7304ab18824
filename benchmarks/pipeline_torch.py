"""jdist's pipeline schedules beside PyTorch's (``torch.distributed.pipelining``, torch 2.13): each rank's
order of ops, the ticks, the bubble and the peak stash, for p=4 stages, m=8 micro-batches (and --grid:
p in {2, 4, 8} x m in {p, 2p, 4p}).

torch's schedules build each rank's list of actions without running anything: ``_get_pipeline_order``
(GPipe, 1F1B) and ``_calculate_single_rank_operations`` (the multi-stage ones), read here with no
process group (the schedule objects are made with ``object.__new__`` and given the few attributes those
methods read). Both sides' orders are then timed by one rule, jdist's (``_orders.timed``: each op at the
first tick its device is free and its inputs exist, one tick per op), so ticks and bubble compare like
for like; torch's own lists pad waits with None by formulas that overstate Interleaved1F1B's drain (its
list for p=4, m=8, v=2 is 46 steps long, bubble 0.304). The peak stash counts, per rank, the (micro-batch,
stage) pairs between their F and their last backward op (B, or W). Two findings about torch 2.13 are
printed: its 1F1B list numbers the last rank's forwards 1..m instead of 0..m-1 (corrected here before
timing), and its GPipe runs the backwards in forward order where ``jax.grad`` runs them in reverse.

torch is an optional dev dependency of this script only (``pip install torch==2.13.0``); without it the
script says so and exits 0. ``--orders`` prints the p=4, m=8 orders in torch's notation ("3F0": stage 3,
forward, micro-batch 0; "I": input gradient) for tests/test_pipeline_schedules.py's fixtures.

Run: python benchmarks/pipeline_torch.py [--quick] [--grid] [--orders]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

import numpy as np  # noqa: E402

from jdist.strategies.pipeline import pipeline_schedule  # noqa: E402
from jdist.strategies.pipeline._orders import timed  # noqa: E402

# (torch class, v, jdist schedule, repeats)
PAIRS = (("ScheduleGPipe", 1, "gpipe", None), ("Schedule1F1B", 1, "1f1b", None),
         ("ScheduleInterleaved1F1B", 2, "interleaved_1f1b", 2), ("ScheduleInterleavedZeroBubble", 1, "zb_h1", 1),
         ("ScheduleInterleavedZeroBubble", 2, "zb_h1", 2), ("ScheduleZBVZeroBubble", 2, "zbv", None))


def torch_orders(name: str, p: int, m: int, v: int) -> tuple[list[list[tuple[str, int, int]]], list[str]]:
  """Each rank's compute ops (kind, micro-batch, stage) in torch's order, and notes on what was corrected."""
  import torch.distributed.pipelining.schedules as S

  cls = getattr(S, name)
  s = object.__new__(cls)
  s._n_microbatches, s._num_stages, s.num_stages = m, p * v, p * v
  s.pp_group_size, s.n_local_stages = p, v
  s.number_of_rounds = max(1, m // p)
  s.microbatches_per_round = m // s.number_of_rounds
  if name in ("ScheduleGPipe", "Schedule1F1B"):
    lists = s._get_pipeline_order()
  else:
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(p)}
    lists = s._add_bubbles_to_actions(p * v) if name == "ScheduleInterleavedZeroBubble" else s.pipeline_order
  kind = {"F": "F", "B": "B", "I": "B", "W": "W"}
  orders = [[(kind[a.computation_type.value], a.microbatch_index, a.stage_index) for a in lists[r]
             if a is not None and a.computation_type.value in kind] for r in range(p)]
  notes = []
  for r, ops in enumerate(orders):
    forwards = sorted(i for k, i, _ in ops if k == "F")
    if forwards and forwards != list(range(len(forwards))) and forwards == list(range(1, len(forwards) + 1)):
      orders[r] = [(k, i - 1 if k == "F" else i, j) for k, i, j in ops]  # torch 2.13's Schedule1F1B, last rank
      notes.append(f"{name}: rank {r}'s forwards numbered 1..{m} in torch's list, renumbered 0..{m - 1}")
  return orders, notes


def stage_ids(name: str, p: int, v: int) -> np.ndarray:
  if name == "ScheduleZBVZeroBubble":
    return np.stack([np.arange(p), 2 * p - 1 - np.arange(p)], axis=1)
  return np.arange(p * v).reshape(v, p).T


def peak_stash(orders) -> list[int]:
  """Per rank: the most (micro-batch, stage) pairs between their F and their last backward op."""
  peaks = []
  for ops in orders:
    last = {}
    for n, (k, i, j) in enumerate(ops):
      if k != "F":
        last[i, j] = n
    held = peak = 0
    for n, (k, i, j) in enumerate(ops):
      held += k == "F"
      peak = max(peak, held)
      held -= last.get((i, j)) == n
    peaks.append(peak)
  return peaks


def jdist_orders(schedule) -> list[list[tuple[str, int, int]]]:
  """Each device's ops in tick order; for "gpipe"/"circular" the forward table, then the backwards as
  ``jax.grad`` runs them (the forward ticks in reverse)."""
  p, ids = schedule.num_stages, schedule.stage_ids
  orders = []
  for d in range(p):
    cells = [(t, int(schedule.table[t, d]), int(ids[d, schedule.lap[t, d]])) for t in range(schedule.ticks)
             if schedule.table[t, d] >= 0]
    if schedule.op is None:
      orders.append([("F", i, j) for _, i, j in cells] + [("B", i, j) for _, i, j in cells[::-1]])
    else:
      orders.append([(str(schedule.op[t, d]), i, j) for t, i, j in cells])
  return orders


def notation(ops, split: bool) -> str:
  return " ".join(f"{j}{'I' if (k == 'B' and split) else k}{i}" for k, i, j in ops)


def compare(p: int, m: int) -> tuple[list, list, list[str]]:
  rows, records, notes = [], [], []
  for name, v, ours, repeats in PAIRS:
    theirs, found = torch_orders(name, p, m, v)
    notes += found
    sched = pipeline_schedule(p, m, ours, repeats=repeats)
    mine = jdist_orders(sched)
    t_table = timed(theirs, stage_ids(name, p, v))[0]
    t_ticks, t_bubble = t_table.shape[0], float(np.mean(t_table < 0))
    j_ticks = sched.ticks * (2 if sched.op is None else 1)  # gpipe / circular: the backward ticks too
    same = "yes" if mine == theirs else "no" if sorted(map(sorted, mine)) != sorted(map(sorted, theirs)) else (
        "same ops, other order")
    rows.append((f"{name} (v={v})", f"{ours}" + (f" v={repeats}" if repeats else ""), same, f"{j_ticks} / {t_ticks}",
                 f"{sched.bubble:.3f} / {t_bubble:.3f}", " ".join(map(str, sched.peak_stash)) + " / "
                 + " ".join(map(str, peak_stash(theirs)))))
    records.append({"torch": name, "v": v, "jdist": ours, "repeats": repeats, "same_order": same,
                    "ticks": [j_ticks, t_ticks], "bubble": [sched.bubble, t_bubble],
                    "peak_stash": [sched.peak_stash.tolist(), peak_stash(theirs)]})
  return rows, records, notes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="p=4, m=8 only (the default too)")
  parser.add_argument("--grid", action="store_true", help="also p in {2, 4, 8} x m in {p, 2p, 4p}")
  parser.add_argument("--orders", action="store_true", help="print the p=4, m=8 orders in torch's notation")
  args = parser.parse_args()
  try:
    import torch
  except ImportError:
    print("torch is not installed: skipped (pip install torch==2.13.0 to compare with torch.distributed.pipelining)")
    return
  columns = ["torch", "jdist", "same order per rank", "ticks jdist / torch", "bubble jdist / torch",
             "peak stash per rank jdist / torch"]
  rows, records, notes = compare(4, 8)
  print_table(f"p=4, m=8: jdist vs torch {torch.__version__} (both orders timed by one rule)", columns, rows)
  grid = {}
  if args.grid and not args.quick:
    for p in (2, 4, 8):
      for m in (p, 2 * p, 4 * p):
        r, rec, n = compare(p, m)
        grid[f"p{p}_m{m}"] = rec
        notes += n
        print_table(f"p={p}, m={m}", columns, r)
  for note in dict.fromkeys(notes):
    print("note:", note)
  if args.orders:
    for name, v, ours, repeats in PAIRS[2:]:
      theirs, _ = torch_orders(name, 4, 8, v)
      print(f"{name} v={v}:")
      for r, ops in enumerate(theirs):
        print(f"  {r}: {notation(ops, name != 'ScheduleInterleaved1F1B')}")
  write_json("pipeline_torch", {"torch": torch.__version__, "p4_m8": records, "grid": grid,
                                "notes": list(dict.fromkeys(notes))})


if __name__ == "__main__":
  main()
