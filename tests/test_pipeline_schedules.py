"""Pipeline schedules as numpy tables (no devices): ticks and bubble against the formulas, 1F1B's order
against Megatron's, the interleaved and zero-bubble orders against torch 2.13's, peak stashes, the
dependency replay, stash slots, the executor's plan replayed message by message, and the table text."""
import dataclasses

import numpy as np
import pytest

from jdist.errors import OptionError
from jdist.strategies.pipeline import pipeline_schedule
from jdist.strategies.pipeline._orders import round_size
from jdist.strategies.pipeline._schedules import Schedule, check_dependencies, stash_intervals
from jdist.strategies.pipeline._ticks import B_FIRST, B_MID, F_FIRST, F_LAST, F_MID, F_ONLY, IDLE, W_OP, plan


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
  check_dependencies(split_backward(p, m))  # hand-offs of three ticks: the inputs wait in the inbox
  replay(split_backward(p, m))
  if p > 1:  # a backward that runs before the next stage's has sent its cotangent
    early = pipeline_schedule(p, m, "1f1b")
    op, table = early.op.copy(), early.table.copy()
    t0 = int(np.argwhere((op[:, 0] == "B") & (table[:, 0] == 0))[0, 0])
    t1 = int(np.argwhere((op[:, 1] == "B") & (table[:, 1] == 0))[0, 0])
    table[[t0, t1], 0], op[[t0, t1], 0] = table[[t1, t0], 0], op[[t1, t0], 0]  # B(0, 0) with B(0, 1)
    with pytest.raises(RuntimeError, match="table breaks a dependency: .*micro-batch 0 stage 0"):
      check_dependencies(dataclasses.replace(early, table=table, op=op))
  sched = pipeline_schedule(p, m, "1f1b")
  swapped = sched.op.copy()
  t, d = np.argwhere(sched.op == "B")[0]
  swapped[t, d] = "F"  # a backward turned into a second forward
  with pytest.raises(RuntimeError, match="table breaks a dependency"):
    check_dependencies(dataclasses.replace(sched, op=swapped))


@pytest.mark.parametrize("p,m", [(1, 1), (2, 5), (3, 3), (4, 8), (8, 4)])
def test_stash_slots_hold_each_micro_batch_from_its_forward_to_its_last_backward_op(p, m):
  for sched in (pipeline_schedule(p, m, "1f1b"), split_backward(p, m), pipeline_schedule(p, m, "zb_h1")):
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
  # one ppermute per tick: a device forwards on ticks of its own parity and sends cotangents on the others
  assert pl.sends == ((((0, 1), (1, 0), (2, 3), (3, 2)),), (((1, 2), (2, 1)),))
  assert pl.slots == (2, 4, 1)  # inbox (one spare), stash slots = the peak stash, no carry
  # the last device's forward runs the loss too; the first device's backward ends with input_fn's VJP
  assert set(pl.branch[:, 3].flat) == {IDLE, F_LAST, B_MID} and set(pl.branch[:, 0].flat) == {IDLE, F_FIRST, B_FIRST}
  assert isinstance(pipeline_schedule(2, 2, "1f1b"), Schedule)
  # interleaved and zero-bubble devices send both ways on one tick parity: a ppermute per direction
  for name in ("interleaved_1f1b", "zb_h1", "zbv"):
    assert [len(groups) for groups in plan(pipeline_schedule(4, 8, name)).sends] == [2, 2]
  assert set(plan(pipeline_schedule(1, 3, "1f1b")).branch.flat) == {F_ONLY, B_FIRST}


# ---- the interleaved and zero-bubble schedules ---------------------------------------------------------

# torch 2.13's per-rank orders for p=4, m=8 ("3F0": stage 3, forward, micro-batch 0; "I": the input
# gradient, "W": the weight gradient), printed by `python benchmarks/pipeline_torch.py --orders`
TORCH_P4_M8 = {
    ("interleaved_1f1b", 2): [
        "0F0 0F1 0F2 0F3 4F0 4F1 4F2 4F3 0F4 0F5 0F6 4B0 0F7 4B1 4F4 4B2 4F5 4B3 4F6 0B0 4F7 0B1 0B2 0B3 4B4 4B5 4B6 "
        "4B7 0B4 0B5 0B6 0B7",
        "1F0 1F1 1F2 1F3 5F0 5F1 5F2 5F3 1F4 5B0 1F5 5B1 1F6 5B2 1F7 5B3 5F4 1B0 5F5 1B1 5F6 1B2 5F7 1B3 5B4 5B5 5B6 "
        "5B7 1B4 1B5 1B6 1B7",
        "2F0 2F1 2F2 2F3 6F0 6F1 6F2 6B0 6F3 6B1 2F4 6B2 2F5 6B3 2F6 2B0 2F7 2B1 6F4 2B2 6F5 2B3 6F6 6B4 6F7 6B5 6B6 "
        "6B7 2B4 2B5 2B6 2B7",
        "3F0 3F1 3F2 3F3 7F0 7B0 7F1 7B1 7F2 7B2 7F3 7B3 3F4 3B0 3F5 3B1 3F6 3B2 3F7 3B3 7F4 7B4 7F5 7B5 7F6 7B6 7F7 "
        "7B7 3B4 3B5 3B6 3B7"],
    ("zb_h1", 1): [
        "0F0 0F1 0F2 0F3 0I0 0W0 0F4 0I1 0W1 0F5 0I2 0W2 0F6 0I3 0W3 0F7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7",
        "1F0 1F1 1F2 1I0 1F3 1I1 1W0 1F4 1I2 1W1 1F5 1I3 1W2 1F6 1I4 1W3 1F7 1I5 1W4 1I6 1W5 1I7 1W6 1W7",
        "2F0 2F1 2I0 2F2 2I1 2F3 2I2 2W0 2F4 2I3 2W1 2F5 2I4 2W2 2F6 2I5 2W3 2F7 2I6 2W4 2I7 2W5 2W6 2W7",
        "3F0 3I0 3F1 3I1 3F2 3I2 3F3 3I3 3W0 3F4 3I4 3W1 3F5 3I5 3W2 3F6 3I6 3W3 3F7 3I7 3W4 3W5 3W6 3W7"],
    ("zbv", 2): [
        "0F0 0F1 0F2 0F3 0F4 0F5 0F6 7F0 7I0 7W0 7F1 7I1 7W1 7F2 7I2 7W2 7F3 7I3 7W3 0F7 0I0 0W0 7F4 7I4 7W4 0I1 0W1 "
        "7F5 7I5 7W5 0I2 0W2 7F6 7I6 7W6 0I3 0W3 7F7 7I7 7W7 0I4 0W4 0I5 0W5 0I6 0W6 0I7 0W7",
        "1F0 1F1 1F2 1F3 1F4 6F0 1F5 6F1 6I0 6W0 6F2 6I1 6W1 6F3 6I2 6W2 1F6 1I0 1W0 6F4 6I3 6W3 1F7 1I1 1W1 6F5 6I4 "
        "6W4 1I2 1W2 6F6 6I5 6W5 1I3 1W3 6F7 6I6 6W6 1I4 6I7 1I5 1W4 1I6 1W5 1I7 1W6 6W7 1W7",
        "2F0 2F1 2F2 5F0 2F3 5F1 2F4 5F2 5I0 5W0 5F3 5I1 5W1 2F5 2I0 2W0 5F4 5I2 5W2 2F6 2I1 2W1 5F5 5I3 5W3 2F7 2I2 "
        "2W2 5F6 5I4 5W4 2I3 2W3 5F7 5I5 5W5 2I4 5I6 2I5 5I7 2I6 2W4 2I7 2W5 5W6 5W7 2W6 2W7",
        "3F0 4F0 3F1 4F1 3F2 4F2 3F3 4F3 4I0 4W0 3F4 3I0 3W0 4F4 4I1 4W1 3F5 3I1 3W1 4F5 4I2 4W2 3F6 3I2 3W2 4F6 4I3 "
        "4W3 3F7 3I3 3W3 4F7 4I4 4W4 3I4 4I5 3I5 4I6 3I6 4I7 3I7 3W4 4W5 4W6 4W7 3W5 3W6 3W7"],
}


def device_orders(sched):
  """Each device's ops in tick order, in torch's notation."""
  split = sched.split_backward
  return [" ".join(f"{sched.stage_ids[d, sched.lap[t, d]]}{'I' if split and sched.op[t, d] == 'B' else sched.op[t, d]}"
                   f"{sched.table[t, d]}" for t in range(sched.ticks) if sched.table[t, d] >= 0)
          for d in range(sched.num_stages)]


@pytest.mark.parametrize("name,v,ticks,bubble,peak", [("interleaved_1f1b", 2, 38, 3 / 19, [11, 9, 7, 5]),
                                                       ("zb_h1", 1, 27, 3 / 27, [4, 4, 4, 4]),
                                                       ("zbv", 2, 51, 3 / 51, [8, 8, 8, 8])])
def test_orders_equal_torch_s(name, v, ticks, bubble, peak):
  sched = pipeline_schedule(4, 8, name, repeats=v)
  assert device_orders(sched) == TORCH_P4_M8[name, v]
  assert sched.ticks == ticks and sched.bubble == pytest.approx(bubble)
  np.testing.assert_array_equal(sched.peak_stash, peak)
  # ZB-H1: at most half of 1F1B's bubble (0.111 against 0.273) at 1F1B's peak (p on the first device)
  one_f_one_b = pipeline_schedule(4, 8, "1f1b")
  if name == "zb_h1":
    assert sched.bubble <= one_f_one_b.bubble / 2 and sched.peak_stash.max() == one_f_one_b.peak_stash.max()


def grid():
  """Every schedule and v on p in {1, 2, 3, 4, 5, 8} x m in {1, 2, 3, p, p+1, 2p, 3p, 4p} (v > 1: where the
  rounds of p micro-batches divide m)."""
  for p in (1, 2, 3, 4, 5, 8):
    for m in sorted({1, 2, 3, p, p + 1, 2 * p, 3 * p, 4 * p}):
      yield p, m, "1f1b", 1
      yield p, m, "zbv", 2
      for v in (1, 2, 3):
        if v == 1 or m % max(1, m // p) == 0:
          yield p, m, "interleaved_1f1b", v
          yield p, m, "zb_h1", v


def test_peak_stash_and_bubble_on_the_grid():
  for p, m, name, v in grid():
    sched = pipeline_schedule(p, m, name, repeats=v)  # built tables pass check_dependencies
    check_dependencies(sched)
    busy = (sched.table >= 0).sum(axis=0)
    np.testing.assert_array_equal(busy, (3 if sched.split_backward else 2) * m * v)  # every op once
    if name in ("interleaved_1f1b", "zb_h1"):
      g = round_size(p, m, v)
      # Megatron's warm-up (v-1) g + 2(p-1-d) forwards plus the first steady one; ZB-H1 holds (v-1) g + p
      expected = ([min(m * v, (v - 1) * g + 2 * (p - 1 - d) + 1) for d in range(p)] if name == "interleaved_1f1b"
                  else [min(m * v, (v - 1) * g + p)] * p)
      np.testing.assert_array_equal(sched.peak_stash, expected, err_msg=f"{name} p={p} m={m} v={v}")
      if m % p == 0 or (name == "zb_h1" and m >= p):  # the textbook bubble, exactly
        assert sched.bubble == pytest.approx(sched.expected_bubble()), (name, p, m, v)
    if name == "zbv":
      # at most 1F1B's p stages of activations (2p half stages), reached on every device from m = 2p
      assert sched.peak_stash.max() <= 2 * p and (m < 2 * p or (sched.peak_stash == 2 * p).all()), (p, m)
      if m >= 2 * p - 1:
        assert sched.bubble == pytest.approx((p - 1) / (6 * m + p - 1)), (p, m)
    if name == "zb_h1" and v == 1 and m >= p > 1:
      assert sched.bubble <= pipeline_schedule(p, m, "1f1b").bubble / 2, (p, m)


def replay(sched):
  """Runs the executor's plan with messages as labels: every op must find, in the slots the plan names,
  what it needs: ("act", i, j) before F(i, j), ("cot", i, j) before B(i, j), its stash and its carry."""
  pl = plan(sched)
  ticks, p = pl.branch.shape
  last = sched.stage_ids.size - 1
  inbox, stash, carry = ([[None] * n for _ in range(p)] for n in pl.slots)
  for t in range(ticks):
    sent = [None] * p
    for d in range(p):
      branch, i, j = int(pl.branch[t, d]), int(pl.micro[t, d]), int(pl.stage[t, d])
      got, slot = inbox[d][pl.read[t, d]], pl.stash[t, d]
      if branch in (F_MID, F_FIRST, F_LAST, F_ONLY):
        assert branch in (F_FIRST, F_ONLY) or got == ("act", i, j), (t, d, got)
        assert stash[d][slot] is None, (t, d, stash[d][slot])  # a free slot
        stash[d][slot] = ("stash", i, j)
        sent[d] = ("cot", i, j) if j == last else ("act", i, j + 1)
      elif branch in (B_MID, B_FIRST):
        assert got == ("cot", i, j) and stash[d][slot] == ("stash", i, j), (t, d, got)
        if sched.split_backward:
          carry[d][pl.carry[t, d]] = ("carry", i, j)
        else:
          stash[d][slot] = None
        sent[d] = ("cot", i, j - 1) if j > 0 else None
      elif branch == W_OP:
        assert stash[d][slot] == ("stash", i, j) and carry[d][pl.carry[t, d]] == ("carry", i, j), (t, d)
        stash[d][slot] = carry[d][pl.carry[t, d]] = None
    for k, pairs in enumerate(pl.sends[t % 2]):
      for src, dst in pairs:
        inbox[dst][pl.recv[k, t, dst]] = sent[src]
    for d in range(p):
      inbox[d][pl.local[t, d]] = sent[d]
      inbox[d][-1] = None  # the spare slot
  assert all(s is None for dev in stash for s in dev), "a stash slot still held after the step"


def test_the_plan_delivers_every_message_and_keeps_every_stash():
  for p, m, name, v in grid():
    replay(pipeline_schedule(p, m, name, repeats=v))


def test_repeats_and_microbatches_each_schedule_takes():
  for name, bad in (("1f1b", 2), ("gpipe", 2), ("zbv", 3)):
    with pytest.raises(OptionError) as e:
      pipeline_schedule(4, 8, name, repeats=bad)
    assert (e.value.name, e.value.got) == ("repeats", bad)
  with pytest.raises(OptionError) as e:  # rounds of 4 micro-batches: 2 rounds do not divide 9
    pipeline_schedule(4, 9, "interleaved_1f1b")
  assert (e.value.name, e.value.got) == ("microbatches", 9)
  assert pipeline_schedule(4, 6, "zb_h1", repeats=2).ticks > 0  # 6 < 2p: one round of 6
  np.testing.assert_array_equal(pipeline_schedule(2, 4, "zbv").stage_ids, [[0, 3], [1, 2]])  # the V
