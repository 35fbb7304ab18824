"""Mixed precision, remat policies and MFU: the code paths of the GPU benchmark, checked on the CPU."""
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.analysis.perf import mfu, peak_flops
from jdist.models import gpt, mlp
from jdist.precision import mixed_precision
from tests.conftest import assert_trees_all_close, benchmark_module

CFG = gpt.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4)
PARAMS = gpt.init(jax.random.key(0), CFG)
BATCH = gpt.synthetic_tokens(jax.random.key(1), 8, CFG)


def test_fp32_policy_is_the_identity():
  ref = jax.jit(jax.grad(gpt.loss_fn(CFG)))(PARAMS, BATCH)
  ours = jax.jit(jax.grad(mixed_precision(gpt.loss_fn(CFG), compute_dtype=jnp.float32)))(PARAMS, BATCH)
  assert_trees_all_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "int8", "not a dtype"])
def test_a_compute_dtype_that_is_not_floating_is_an_error(dtype):
  # cast to an integer dtype, the parameters would get a zero gradient and training would never move
  with pytest.raises(TypeError, match="compute_dtype must be a floating-point dtype .* would get no gradient"):
    mixed_precision(gpt.loss_fn(CFG), compute_dtype=dtype)


def test_bf16_compute_keeps_fp32_master_weights_and_gradients():
  cfg = gpt.GPTConfig(**{**CFG.__dict__, "compute_dtype": jnp.bfloat16})
  loss = mixed_precision(gpt.loss_fn(cfg))
  l32, g32 = jax.jit(jax.value_and_grad(gpt.loss_fn(CFG)))(PARAMS, BATCH)
  l16, g16 = jax.jit(jax.value_and_grad(loss))(PARAMS, BATCH)
  assert l16.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)
  cos = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))) / (
      float(optax.tree.norm(g16)) * float(optax.tree.norm(g32)))
  assert cos > 0.99
  strategy = jdist.data_parallel(loss, optax.adamw(1e-3), jdist.make_mesh(data=2, devices=jax.devices()[:2]))
  state, metrics = strategy.step(strategy.init(PARAMS), strategy.shard_batch(jax.device_get(BATCH)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((state.params, state.opt_state))
             if jnp.issubdtype(p.dtype, jnp.floating))


def test_mixed_precision_with_aux_and_a_mismatch_is_clear():
  with_aux = lambda p, b: (gpt.loss_fn(CFG)(p, b), {"n": jnp.sum(b["tokens"] > 10)})
  loss, aux = mixed_precision(with_aux, has_aux=True)(PARAMS, BATCH)
  assert loss.dtype == jnp.float32 and int(aux["n"]) == int(jnp.sum(BATCH["tokens"] > 10))
  with pytest.raises(TypeError, match=r"has_aux=False\): loss_fn returned a tuple of 2.*pass has_aux=True"):
    mixed_precision(with_aux)(PARAMS, BATCH)
  with pytest.raises(TypeError, match=r"has_aux=True\): loss_fn returned a "):
    mixed_precision(gpt.loss_fn(CFG), has_aux=True)(PARAMS, BATCH)
  # the pipeline's loss_fn(params, y, batch) is not a loss_fn(params, batch): said so, not a raw argument count
  with pytest.raises(TypeError, match=r"called with 3 arguments, as jdist.pipeline calls its loss_fn\(params, y, "
                                      r"batch\)"):
    mixed_precision(lambda p, y, b: jnp.mean(y))(PARAMS, jnp.ones(3), BATCH)


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_remat_policies_do_not_change_the_mathematics(remat):
  cfg = gpt.GPTConfig(**{**CFG.__dict__, "remat": remat})
  ref = jax.jit(jax.grad(gpt.loss_fn(CFG)))(PARAMS, BATCH)
  ours = jax.jit(jax.grad(gpt.loss_fn(cfg)))(PARAMS, BATCH)
  assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="Unknown remat policy: 'some'"):
    gpt.GPTConfig(remat="some")


def test_dots_saveable_recomputes_xla_attention_around_saved_matmuls():
  # the projections and the MLP under the dots policy; XLA's attention under a checkpoint of its own
  # (recomputed, not kept as S x S probabilities); cuDNN's is kept (tests/test_gpu.py checks it on a GPU)
  layer, x = jax.tree.map(lambda a: a[0], PARAMS["blocks"]), jnp.zeros((2, CFG.seq_len, CFG.d_model))

  def checkpoints(remat):
    cfg = gpt.GPTConfig(**{**CFG.__dict__, "remat": remat, "attention_impl": "xla"})
    eqns = jax.make_jaxpr(lambda p, x: gpt.block(p, x, cfg))(layer, x).jaxpr.eqns
    return [e.params["policy"] for e in eqns if "remat" in e.primitive.name or "checkpoint" in e.primitive.name]

  assert checkpoints("none") == [] and checkpoints("full") == []  # "full" wraps the whole block, outside
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert checkpoints("dots_saveable") == [dots, None, dots]


def test_mfu_and_peaks():
  assert peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200")) == 989e12
  assert peak_flops(types.SimpleNamespace(device_kind="NVIDIA H100 PCIe")) == 756e12
  for nvl in ("NVIDIA H100 NVL", "NVIDIA H200 NVL"):
    assert peak_flops(types.SimpleNamespace(device_kind=nvl)) == 835e12
  assert peak_flops(types.SimpleNamespace(device_kind="cpu")) is None
  # JAX's names: the longest matching key wins
  kinds = {"NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "TPU v5 lite": 197e12, "TPU v5": 459e12}
  assert {k: peak_flops(types.SimpleNamespace(device_kind=k)) for k in kinds} == kinds
  with pytest.raises(ValueError, match="peak must be a positive FLOP/s figure"):
    mfu(1.0, 1.0, peak=0)
  with pytest.raises(ValueError, match="GPTConfig.n_heads must be >= 1, got 0"):
    gpt.GPTConfig(n_heads=0)
  assert mfu(989e12 * 0.5, 1.0, peak=989e12) == pytest.approx(0.5)
  assert mfu(1.0, 1.0, peak=None) is None or peak_flops() is not None
  # the reference script's count for its 124M configuration
  cfg = gpt.GPTConfig(vocab_size=32768, seq_len=1024, d_model=768, n_layers=12, n_heads=12)
  nparams = cfg.num_params()
  nonemb = nparams - 32768 * 768 - 1024 * 768
  assert gpt.flops_per_token(cfg) == pytest.approx(6 * (nonemb + 32768 * 768) + 12 * 12 * 768 * 1024 / 2)


def _gpu_bench(monkeypatch):
  return benchmark_module(monkeypatch, "gpu_gpt")


def test_gpu_benchmark_code_paths_on_cpu(monkeypatch):
  bench = _gpu_bench(monkeypatch)
  shape = bench.CONFIGS["cpu-smoke"]
  for policy, unroll in zip(bench.POLICIES, (1, True)):
    ours = bench.compare(shape, None, remat="dots_saveable", unroll=unroll, policy=policy, steps=2, rounds=2,
                         with_fit=True)
    assert ours["step_s"] > 0 and ours["plain_step_s"] > 0 and ours["fit_step_s"] > 0
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=2, n_heads=4)
  assert ours["flops"] == gpt.flops_per_token(cfg) * 4 * 64



def test_gpu_benchmark_records_a_failed_row_and_goes_on(monkeypatch, tmp_path):
  # a row that fails (out of memory, a compiler error) must not lose the rows measured before and after it
  import json
  bench = _gpu_bench(monkeypatch)

  def fake_compare(shape, impl, *, unroll, **kwargs):
    if unroll is True:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return {"step_s": 0.02, "plain_step_s": 0.025, "fit_step_s": 0.021, "compile_s": 1.0, "flops": 1e9}

  monkeypatch.setattr(bench, "compare", fake_compare)
  monkeypatch.setenv("JDIST_BENCH_OUT", str(tmp_path))
  monkeypatch.setattr("sys.argv", ["gpu_gpt.py", "--cpu-smoke", "--unroll", "0", "1"])
  with pytest.raises(SystemExit, match="some rows failed"):
    bench.main()
  runs = json.loads((tmp_path / "gpu_gpt.json").read_text())["runs"]
  assert [r["unroll"] for r in runs] == ["all", 1]
  assert "out of memory" in runs[0]["error"]
  assert runs[1]["ratio_tokens_per_s"] == pytest.approx(1.25)

def test_jdist_gpt_is_the_reference_gpt(monkeypatch):
  # the GPU benchmark compares the same model: the plain reference's forward on jdist's weights
  bench = _gpu_bench(monkeypatch)
  import _plain_gpt as plain  # benchmarks/ is on the path after _gpu_bench()

  shape = dict(bench.CONFIGS["cpu-smoke"], n_layers=3)
  strategy, cfg = bench.jdist_setup(shape, None, "none")
  params = gpt.init(jax.random.key(0), cfg)
  as_plain = {"wte": params["wte"], "wpe": params["wpe"], "lnf": params["lnf"], "blocks": [
      {"ln1": b["ln1"], "qkv": b["qkv"].reshape(cfg.d_model, 3 * cfg.d_model), "o": b["o"], "ln2": b["ln2"],
       "fc": b["fc"], "proj": b["proj"]} for b in (jax.tree.map(lambda x: x[i], params["blocks"])
                                                    for i in range(cfg.n_layers))]}
  tokens = gpt.synthetic_tokens(jax.random.key(1), 4, cfg)["tokens"][:, :-1]
  ours = jax.jit(lambda p, t: gpt.apply(p, t, cfg))(params, tokens)
  theirs = jax.jit(lambda p, t: plain.fwd(p, t, cfg.n_heads, None))(as_plain, tokens)
  assert ours.dtype == theirs.dtype == jnp.float32
  # both compute in bf16 and differ only in the order of a few casts: measured up to 1.7 bf16 units
  # (2^-8) of the largest logit over 4 seeds; a model missing a block or the attention output is 30x off
  bf16_unit = 2.0**-8 * float(jnp.max(jnp.abs(theirs)))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=4 * bf16_unit)


def test_gpu_ablation_variants_remove_what_they_say(monkeypatch):
  # benchmarks/gpu_gpt_ablate.py times jdist's step without its gradient norm and its token-id check:
  # patched in while the step is traced, restored afterwards
  _gpu_bench(monkeypatch)
  import gpu_gpt_ablate as ablate  # benchmarks/ is on the path after _gpu_bench()
  from gpu_gpt import jdist_setup

  shape = ablate.CONFIGS["cpu-smoke"]
  tokens = np.array(gpt.synthetic_tokens(jax.random.key(2), 4, gpt.GPTConfig(vocab_size=256, seq_len=64))["tokens"])
  tokens[0, 0] = 10**6  # outside the vocabulary: a NaN loss, unless the check is patched out
  for variant, finite, zero_norm in (("lean", True, True), ("straight", False, False), ("no_norm", False, True)):
    with ablate._patches(variant):
      strategy, cfg = jdist_setup(shape, None, "none", True)
      state = strategy.init(gpt.init(jax.random.key(1), cfg))
      _, metrics = strategy.step(state, strategy.shard_batch({"tokens": tokens}))
    assert np.isfinite(float(metrics["loss"])) == finite, variant
    assert (float(metrics["grad_norm"]) == 0.0) == zero_norm, variant
  ours = gpt.cross_entropy
  with ablate._patches("optax_ce"):
    assert gpt.cross_entropy is not ours
  assert gpt.cross_entropy is ours
  assert ablate.parse_variant("scan2_dots_saveable") == ("scan2", 2, "dots_saveable")
  assert ablate.parse_variant("scan1_full_nocse") == ("scan1", 1, "full")
  with pytest.raises(ValueError, match="unknown variant 'scan0'"):
    ablate.parse_variant("scan0")
  # _nocse: the remat regions lose their CSE barrier, only while the variant's step is traced
  cfg = gpt.GPTConfig(**{**CFG.__dict__, "remat": "dots_saveable"})
  layer = jax.tree.map(lambda a: a[0], PARAMS["blocks"])
  barriers = lambda: [e.params["prevent_cse"] for e in jax.make_jaxpr(lambda p, x: gpt.block(p, x, cfg))(
      layer, jnp.zeros((2, CFG.seq_len, CFG.d_model))).jaxpr.eqns if "prevent_cse" in e.params]
  with ablate._patches("scan1_dots_saveable_nocse"):  # the two dot regions and XLA's attention between them
    assert barriers() == [False, False, False]
  assert barriers() == [True, True, True]


def _trace(events, lines):
  """A perfetto trace as jax.profiler writes it on a GPU: process and thread names, then complete events."""
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 701, "args": {"name": "/host:CPU"}}]
  meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
           for (pid, tid), name in lines.items()]
  return {"traceEvents": meta + [{"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
                                 for pid, tid, name, ts, dur in events]}


def test_gpu_profile_sums_device_kernels_by_kind(monkeypatch):
  _gpu_bench(monkeypatch)
  import gpu_profile as prof  # benchmarks/ is on the path after _gpu_bench()

  lines = {(1, 7): "Stream #7(Compute)", (1, 8): "Stream #8(Compute)", (1, 99): "XLA Ops", (701, 5): "python"}
  kernels = [(1, 7, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 40),
             (1, 7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 50, 30),
             (1, 8, "loop_multiply_fusion", 60, 30),  # overlaps the attention on the other stream by 20
             (1, 7, "input_reduce_fusion_3", 100, 10), (1, 7, "nvjet_hsh_256x128_2cta", 200, 40)]
  trace = _trace(kernels + [(1, 99, "fusion.12", 0, 240), (701, 5, "PjitFunction(step)", 0, 300)], lines)
  events = prof.kernel_events(trace)
  assert sorted(e["name"] for e in events) == sorted(k[2] for k in kernels)  # not the XLA Ops line or the host
  assert prof.busy_us(events) == 40 + 40 + 10 + 40  # [0, 40), [50, 90), [100, 110), [200, 240)
  s = prof.summarize(events, steps=2, wall_s=300e-6, top=2)
  assert s["kinds_ms"] == pytest.approx({"attention": 0.015, "matmul": 0.04, "collective": 0.0, "copy": 0.0,
                                         "reduction": 0.005, "elementwise": 0.015, "other": 0.0})
  assert s["wall_ms"] == pytest.approx(0.15) and s["busy_ms"] == pytest.approx(0.065)
  assert s["idle_ms"] == pytest.approx(0.085) and s["kernels_per_step"] == 2.5
  assert [t["name"] for t in s["top"]] == [kernels[0][2], kernels[4][2]]
  assert prof.device_lines(trace)["/device:GPU:0 / Stream #7(Compute)"] == 4
  # a trace without stream lines: the XLA Ops line, classified by the HLO text in its arguments
  ops = _trace([(1, 99, "custom-call.3", 0, 10)], {(1, 99): "XLA Ops"})
  ops["traceEvents"][-1]["args"] = {"long_name": 'custom_call_target="__cublas$lt$matmul"'}
  assert [prof.kind_of(e["name"], e.get("args")) for e in prof.kernel_events(ops)] == ["matmul"]


def test_gpu_scripts_take_jdist_bench_s_quick_and_skip_without_a_gpu(monkeypatch, capsys):
  _gpu_bench(monkeypatch)
  import gpu_gpt_ablate
  import gpu_profile
  for name, script in (("gpu_profile.py", gpu_profile), ("gpu_gpt_ablate.py", gpu_gpt_ablate)):
    monkeypatch.setattr("sys.argv", [name, "--quick"])
    script.main()
    assert f"benchmarks/{name} needs a GPU" in capsys.readouterr().out


def test_gpu_profile_code_paths_on_cpu(monkeypatch, tmp_path):
  import json
  _gpu_bench(monkeypatch)
  import gpu_profile as prof  # benchmarks/ is on the path after _gpu_bench()

  monkeypatch.setenv("JDIST_BENCH_OUT", str(tmp_path))
  monkeypatch.setattr("sys.argv", ["gpu_profile.py", "--cpu-smoke", "--variants", "straight", "--steps", "1",
                                   "--keep-traces"])
  prof.main()
  runs = json.loads((tmp_path / "gpu_profile.json").read_text())["runs"]
  assert [r["variant"] for r in runs] == ["plain", "straight"]
  for r in runs:
    assert r["wall_ms"] > 0 and r["kernels_per_step"] > 0 and sum(r["kinds_ms"].values()) > 0
  assert sorted(p.name for p in tmp_path.glob("trace_*.json.gz")) == [
      "trace_cpu-smoke_plain.json.gz", "trace_cpu-smoke_straight.json.gz"]


@pytest.mark.parametrize("unroll", [2, True])
def test_scan_unroll_does_not_change_the_mathematics(unroll):
  cfg4 = gpt.GPTConfig(**{**CFG.__dict__, "n_layers": 4})
  params = gpt.init(jax.random.key(0), cfg4)
  ref = jax.jit(jax.value_and_grad(gpt.loss_fn(cfg4)))(params, BATCH)
  ours = jax.jit(jax.value_and_grad(gpt.loss_fn(gpt.GPTConfig(**{**cfg4.__dict__, "scan_unroll": unroll}))))(
      params, BATCH)
  assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-7)
  for bad in (0, False, 1.5):
    with pytest.raises(ValueError, match="scan_unroll must be a positive int or True"):
      gpt.GPTConfig(scan_unroll=bad)


def test_attention_auto_picks_cudnn_only_where_it_applies():
  pick = gpt.attention_backend
  assert pick("auto", jnp.bfloat16, 64, "gpu") == "cudnn"
  assert pick("auto", jnp.float16, 128, "gpu") == "cudnn"
  assert pick("auto", jnp.float32, 64, "gpu") == "xla"  # cuDNN's fused attention is half precision only
  assert pick("auto", jnp.bfloat16, 160, "gpu") == "xla"  # head size above 128
  assert pick("auto", jnp.bfloat16, 64, "cpu") == "xla"
  assert pick("cudnn", jnp.float32, 64, "cpu") == "cudnn" and pick(None, jnp.bfloat16, 64, "gpu") == "xla"
  q = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(ValueError, match=r"Unknown attention implementation 'flash'. It needs to be one of \['auto'"):
    gpt.attention(q, q, q, "flash")
  # on this CPU host "auto" is XLA's attention: the same numbers as implementation="xla"
  xla = gpt.GPTConfig(**{**CFG.__dict__, "attention_impl": "xla"})
  assert CFG.attention_impl == "auto"
  assert_trees_all_close(jax.jit(jax.grad(gpt.loss_fn(CFG)))(PARAMS, BATCH),
                         jax.jit(jax.grad(gpt.loss_fn(xla)))(PARAMS, BATCH), rtol=0, atol=0)
  with pytest.raises(ValueError, match="Unknown attention_impl: 'flash'"):
    gpt.GPTConfig(attention_impl="flash")


def _matmul_dtypes(fn, *args):
  """The operand dtypes of every dot_general in ``fn``'s jaxpr (nested jaxprs included)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_mixed_precision_computes_in_bf16_on_fp32_inputs():
  # an fp32 input would promote the bf16 weights back to fp32 at the first matmul: the batch is cast too
  params = mlp.init(jax.random.key(0), [8, 16, 4])
  batch = {"x": np.ones((4, 8), np.float32), "y": np.zeros((4,), np.int32)}
  ours = _matmul_dtypes(jax.grad(mixed_precision(mlp.loss)), params, batch)
  assert ours and set(ours) == {("bfloat16", "bfloat16")}, ours
  kept = _matmul_dtypes(mixed_precision(mlp.loss, cast_batch=False), params, batch)
  assert ("float32", "bfloat16") in kept  # what the old default did


def test_gpt_rejects_long_sequences_and_makes_bad_token_ids_nan():
  stage_fn, pipe_loss, input_fn, to_pipeline = gpt.pipeline_fns(CFG)
  good = float(gpt.loss(PARAMS, BATCH, CFG))
  assert np.isfinite(good)
  for position, bad in ((3, CFG.vocab_size), (3, -1), (-1, 10_000), (-1, -1)):  # inputs and targets
    tokens = BATCH["tokens"].at[0, position].set(bad)
    assert np.isnan(float(gpt.loss(PARAMS, {"tokens": tokens}, CFG))), (position, bad)  # not clamped or wrapped
    pipe = to_pipeline(PARAMS)
    y = jax.lax.scan(lambda h, layer: (stage_fn(layer, h), None), input_fn(pipe, {"tokens": tokens}), pipe["stages"])[0]
    assert np.isnan(float(pipe_loss(pipe, y, {"tokens": tokens}))), (position, bad)
  with pytest.raises(ValueError, match=r"tokens have shape \(8, 40\); expected int\[batch, S\] with S <= 17 "
                                       r"\(GPTConfig.seq_len = 16"):
    gpt.loss(PARAMS, {"tokens": jnp.zeros((8, 40), jnp.int32)}, CFG)


def test_gpt_pipeline_stage_follows_the_remat_policy():
  names = lambda cfg: {e.primitive.name for e in jax.make_jaxpr(gpt.pipeline_fns(cfg)[0])(
      jax.tree.map(lambda x: x[0], PARAMS["blocks"]), jnp.zeros((2, CFG.seq_len, CFG.d_model))).jaxpr.eqns}
  assert not any("remat" in n or "checkpoint" in n for n in names(CFG))
  assert any("remat" in n or "checkpoint" in n for n in names(gpt.GPTConfig(**{**CFG.__dict__, "remat": "full"})))
