"""comm_report reads collectives and their bytes from compiled HLO."""
import jax
import numpy as np
import optax

import jdist
from jdist.analysis import comm_report
from jdist.models import mlp


def test_data_parallel_step_has_one_all_reduce_of_the_gradients():
  params = mlp.init(jax.random.key(0), [64, 128, 10])
  strategy = jdist.data_parallel(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=8))
  state = strategy.init(params)
  batch = strategy.shard_batch({"x": np.ones((64, 64), np.float32), "y": np.zeros(64, np.int32)})
  report = comm_report(strategy.step.lower(state, batch))
  grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
  ar = report["all-reduce"]
  assert ar.count == 1
  assert ar.payload_bytes == grad_bytes + 4  # the gradients and the loss, fused into one all-reduce
  np.testing.assert_allclose(report.total_sent_bytes, 2 * 7 / 8 * (grad_bytes + 4))
  assert "all-reduce" in report.table()
  # what it cannot read is an error, not an empty report: StableHLO text, a jitted function, a misspelt kind
  import pytest
  lowered = strategy.step.lower(state, batch)
  with pytest.raises(ValueError, match=r"given StableHLO text .* lowered.compile\(\).as_text\(\)"):
    comm_report(lowered.as_text())
  assert comm_report(lowered.compile().as_text())["all-reduce"].count == 1
  with pytest.raises(TypeError, match="comm_report takes a compiled or lowered function"):
    comm_report(strategy.step)
  with pytest.raises(KeyError, match="'all_reduce' is not a collective comm_report counts"):
    report["all_reduce"]


def test_hlo_formats():
  hlo = "\n".join([
      "HloModule m, num_partitions=8",
      "  %a = f32[1024]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
      "  %b = bf16[8,16]{1,0} all-gather(%y), channel_id=2, replica_groups=[4,2]<=[8], dimensions={0}",
      "  %c = f32[16]{0} reduce-scatter(%z), channel_id=3, replica_groups=mesh['data'=2,'model'=4] {'model'}",
      "  %d = (f32[256]{0}, f32[256]{0}) collective-permute-start(%w), source_target_pairs={{0,1},{1,0}}",
      "  %e = f32[256]{0} collective-permute-done(%d)",
      "  ROOT %f = s32[4,4]{1,0} all-to-all(%v), replica_groups={{0,1,2,3}}, dimensions={0}",
  ])
  r = comm_report(hlo)
  assert r["all-reduce"].payload_bytes == 4096 and r["all-reduce"].sent_bytes == 2 * 3 / 4 * 4096
  assert r["all-gather"].payload_bytes == 256 and r["all-gather"].sent_bytes == 256 / 2
  assert r["reduce-scatter"].sent_bytes == 3 * 64
  assert r["collective-permute"].count == 1 and r["collective-permute"].sent_bytes == 1024
  assert r["all-to-all"].sent_bytes == 3 / 4 * 64
  assert r.total_count == 5


def test_collectives_in_loop_bodies_count_once_per_iteration():
  mesh = jdist.make_mesh(data=8)
  from jax.sharding import PartitionSpec as P

  def body(x):
    def step(c, _):
      return c + jax.lax.psum(c, "data") * 0.5, None
    return jax.lax.scan(step, x, None, length=5)[0]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  report = comm_report(f.lower(np.ones((8, 16), np.float32)))
  assert report["all-reduce"].count == 5 and report["all-reduce"].payload_bytes == 5 * 16 * 4
  assert not report.unknown_trip_counts


def test_async_collectives_count_their_results():
  # GPU HLO: an all-reduce-start's shape is its result; all-gather-start and collective-permute-start
  # hold (operand, result[, u32[] contexts])
  hlo = "\n".join([
      "HloModule m, num_partitions=8",
      "  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %p), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add",
      "  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)",
      "  %ags = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %p), channel_id=2, replica_groups=[1,8]<=[8]",
      "  %agd = f32[64]{0} all-gather-done((f32[8]{0}, f32[64]{0}) %ags)",
      "  %cps = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%w), "
      "source_target_pairs={{0,1},{1,2}}",
  ])
  r = comm_report(hlo)
  assert r["all-reduce"].payload_bytes == 4096 and r["all-reduce"].sent_bytes == 2 * 7 / 8 * 4096
  assert r["all-gather"].payload_bytes == 256 and r["all-gather"].sent_bytes == 7 / 8 * 256
  assert r["collective-permute"].payload_bytes == 1024 and r["collective-permute"].sent_bytes == 1024


def test_partial_permutes_count_the_busiest_device_and_match_the_theory():
  from jax.sharding import PartitionSpec as P

  from jdist.analysis import theory
  from jdist.collectives import allreduce

  for n, algorithm in ((8, "tree"), (6, "tree"), (6, "halving_doubling"), (8, "ring")):
    mesh = jdist.make_mesh(data=n, devices=jax.devices()[:n])
    f = jax.jit(jax.shard_map(lambda x: allreduce(x[0], "data", algorithm=algorithm)[None], mesh=mesh,
                              in_specs=P("data"), out_specs=P("data"), check_vma=False))
    size = 1024 * n
    report = comm_report(f.lower(np.ones((n, size), np.float32)))
    np.testing.assert_allclose(report.total_sent_bytes, theory.allreduce_bytes(4 * size, n, algorithm), rtol=1e-6,
                               err_msg=f"{algorithm} on {n}")


def test_every_branch_of_a_conditional_in_a_loop_counts():
  from jax.sharding import PartitionSpec as P

  mesh = jdist.make_mesh(data=8)

  def body(x, steps):
    def step(c, i):
      branches = [lambda c, k=k: jax.lax.psum(c * k, "data") + k for k in (1.0, 2.0, 3.0)]
      return jax.lax.switch(i % 3, branches, c) * jax.lax.axis_index("data").astype(c.dtype), None
    return jax.lax.scan(step, x, steps)[0]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
  report = comm_report(f.lower(np.ones((8, 16), np.float32), np.arange(6)))
  assert report["all-reduce"].count == 18  # 6 iterations x 3 branches: an upper bound, stated in the docs
