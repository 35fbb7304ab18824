"""Pipeline schedules as numpy tables (no devices): ticks and bubble against the formulas, 1F1B's order
against Megatron's, the dependency replay, stash slots, the 1F1B executor's plan and the table text."""
import dataclasses

import numpy as np
import pytest

from jdist.strategies.pipeline import pipeline_schedule
from jdist.strategies.pipeline._one_f_one_b import BACKWARD_OP, FORWARD_OP, IDLE, STASH, plan
from jdist.strategies.pipeline._schedules import Schedule, check_dependencies, stash_intervals


@pytest.mark.parametrize("p,m", [(2, 1), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_bubble_matches_the_formulas(p, m):
  gpipe = pipeline_schedule(p, m, "gpipe")
  assert gpipe.ticks == m + p - 1
  assert gpipe.bubble == pytest.approx((p - 1) / (m + p - 1))
  if m % p == 0:
    for v in (2, 4):
      circ = pipeline_schedule(p, m, "circular", repeats=v)
      assert circ.ticks == m * v + p - 1
      assert circ.bubble == pytest.approx((p - 1) / (m * v + p - 1))
      # every micro-batch visits every virtual stage once, in order, one device after the next
      for i in range(m):
        ts, ds = np.nonzero(circ.table == i)
        order = np.argsort(ts)
        stages = circ.lap[ts[order], ds[order]] * p + ds[order]
        np.testing.assert_array_equal(stages, np.arange(p * v))
        np.testing.assert_array_equal(np.diff(ts[order]), 1)



def megatron_order(p, s, m):
  """Stage s's ops in Megatron's non-interleaved 1F1B: min(p - s - 1, m) warm-up forwards, then one forward
  and one backward in turn, then the remaining backwards."""
  warm = min(p - s - 1, m)
  ops = [("F", i) for i in range(warm)]
  for k in range(m - warm):
    ops += [("F", warm + k), ("B", k)]
  return ops + [("B", i) for i in range(m - warm, m)]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_1f1b_table(p):
  for m in range(1, 3 * p + 2):
    sched = pipeline_schedule(p, m, "1f1b")
    # 2m busy ticks per device plus the fill and the drain of p - 1 ticks each: GPipe's bubble, forward and back
    assert sched.ticks == 2 * (m + p - 1)
    assert sched.bubble == pytest.approx((p - 1) / (m + p - 1)) == pytest.approx(sched.expected_bubble())
    assert (sched.table >= 0).sum() == 2 * m * p
    # memory: device d holds at most min(p - d, m) stage inputs; GPipe holds all m
    np.testing.assert_array_equal(sched.peak_stash, [min(p - d, m) for d in range(p)])
    assert sched.peak_stash.max() <= p
    np.testing.assert_array_equal(pipeline_schedule(p, m, "gpipe").peak_stash, [m] * p)
    when = {}
    for t, d in zip(*np.nonzero(sched.table >= 0)):
      when["B" if sched.backward[t, d] else "F", int(sched.table[t, d]), int(d)] = int(t)
    for s in range(p):
      ops = sorted((t, k, i) for (k, i, d), t in when.items() if d == s)
      assert [(k, i) for _, k, i in ops] == megatron_order(p, s, m), f"p={p} m={m} stage {s}"
      for i in range(m):
        # hand-offs take one tick: the activation / cotangent a device receives is used on arrival
        if s > 0:
          assert when["F", i, s] == when["F", i, s - 1] + 1
        if s < p - 1:
          assert when["B", i, s] == when["B", i, s + 1] + 1
      assert all(when["B", i, p - 1] > when["F", i, p - 1] for i in range(m))


def test_schedule_table_text():
  text = pipeline_schedule(4, 8, "gpipe").format()
  lines = text.splitlines()
  assert lines[0].split() == ["tick", "dev", "0", "dev", "1", "dev", "2", "dev", "3"]
  assert lines[1].split() == ["0", "0", ".", ".", "."]
  assert lines[4].split() == ["3", "3", "2", "1", "0"]
  assert "bubble: 0.273" in text
  assert lines[-1].startswith("peak stash: 8 8 8 8 ")
  text = pipeline_schedule(4, 8, "1f1b").format()
  lines = text.splitlines()
  assert lines[1].split() == ["0", "F0", ".", ".", "."]
  assert lines[8].split() == ["7", "B0", "F3", "B1", "F2"]
  assert len(lines) == 1 + 22 + 2 and "bubble: 0.273" in text and lines[-1].startswith("peak stash: 4 3 2 1 ")
  assert str(pipeline_schedule(2, 2)) == pipeline_schedule(2, 2).format()  # print(schedule) shows the table




def split_backward(p, m):
  """A table with W cells for the replay and the stash (not a schedule jdist runs): p = 1 stage, F B W per
  micro-batch in turn, or, on more stages, the 1F1B table stretched to three ticks per op with each B's
  W right after it."""
  base = pipeline_schedule(p, m, "1f1b")
  table = -np.ones((3 * base.ticks, p), np.int32)
  op = np.full(table.shape, ".")
  table[::3], op[::3] = base.table, base.op
  b = base.op == "B"
  table[1::3][b], op[1::3][b] = base.table[b], "W"
  return dataclasses.replace(base, table=table, lap=np.zeros_like(table), op=op, name="split")


@pytest.mark.parametrize("p,m", [(1, 3), (2, 2), (4, 8)])
def test_dependency_replay_accepts_valid_tables_and_names_what_breaks(p, m):
  check_dependencies(pipeline_schedule(p, m, "1f1b"))
  stretched = split_backward(p, m)
  if p > 1:  # a hand-off of three ticks: the one-register executor would read a value already overwritten
    with pytest.raises(RuntimeError, match="table breaks a dependency: .*micro-batch 0 stage"):
      check_dependencies(stretched)
  else:
    check_dependencies(stretched)
  sched = pipeline_schedule(p, m, "1f1b")
  swapped = sched.op.copy()
  t, d = np.argwhere(sched.op == "B")[0]
  swapped[t, d] = "F"  # a backward turned into a second forward
  with pytest.raises(RuntimeError, match="table breaks a dependency"):
    check_dependencies(dataclasses.replace(sched, op=swapped))


@pytest.mark.parametrize("p,m", [(1, 1), (2, 5), (3, 3), (4, 8), (8, 4)])
def test_stash_slots_hold_each_micro_batch_from_its_forward_to_its_last_backward_op(p, m):
  for sched in (pipeline_schedule(p, m, "1f1b"), split_backward(p, m)):
    slot, held = stash_intervals(sched)
    np.testing.assert_array_equal(held.max(axis=0), sched.peak_stash)
    for d in range(p):
      owner = {}
      for t in range(sched.ticks):
        i, o = int(sched.table[t, d]), sched.op[t, d]
        if i < 0:
          assert slot[t, d] == -1
        elif o == "F":
          assert slot[t, d] not in owner.values() and 0 <= slot[t, d] < sched.peak_stash.max()
          owner[i] = slot[t, d]
        else:
          assert slot[t, d] == owner[i]  # the backward reads what its forward wrote
          if o == "W" or "W" not in sched.op:
            del owner[i]
  # a split backward holds each stage input one op longer: through its W
  assert (split_backward(4, 8).peak_stash >= pipeline_schedule(4, 8, "1f1b").peak_stash).all()


def test_1f1b_plan_sends_one_way_per_device_and_tick():
  pl = plan(pipeline_schedule(4, 8, "1f1b"))
  assert pl.sends == ([(0, 1), (1, 0), (2, 3), (3, 2)], [(1, 2), (2, 1)])
  assert pl.slots == 4
  # the last device's forward only stashes; everything else runs the op of the table
  assert set(pl.op[:, 3]) == {IDLE, STASH, BACKWARD_OP} and set(pl.op[:, 0]) == {IDLE, FORWARD_OP, BACKWARD_OP}
  with pytest.raises(RuntimeError, match="F and B cells only"):
    plan(split_backward(2, 2))
  assert isinstance(pipeline_schedule(2, 2, "1f1b"), Schedule)
