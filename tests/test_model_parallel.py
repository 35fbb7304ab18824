"""Model parallelism: rules as data (no devices), and sharded / FSDP / TP equal to single-device training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jdist
from jdist.errors import AxisError, OptionError, OptionTypeError, RuleError
from jdist.models import gpt, mlp
from jdist.strategies.model_parallel import fsdp, partition_specs, tp_mlp
from tests.conftest import assert_trees_all_close, single_device_reference

CFG = gpt.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=8)
GPT_PARAMS = gpt.init(jax.random.key(0), CFG)
MLP_PARAMS = mlp.init(jax.random.key(0), [16, 32, 8])
MLP_RULES = mlp.tp_rules(2)


def _gpt_batches(steps, batch=16):
  return [jax.device_get(gpt.synthetic_tokens(jax.random.key(100 + i), batch, CFG)) for i in range(steps)]


def _mlp_batches(steps, batch=16):
  rng = np.random.default_rng(0)
  return [{"x": rng.normal(size=(batch, 16)).astype(np.float32), "y": rng.integers(0, 8, batch).astype(np.int32)}
          for _ in range(steps)]


# ---- rules: pure functions, fake meshes, no devices ----------------------------------------------------


def test_rules_give_specs_and_report_without_devices():
  specs, report = partition_specs(GPT_PARAMS, gpt.TP_RULES, {"data": 2, "model": 4})
  assert specs["blocks"]["qkv"] == P(None, None, None, "model")
  assert specs["blocks"]["proj"] == P(None, "model")
  assert specs["wte"] == P()
  assert set(report.unmatched) == {"wte", "wpe", "lnf", "blocks/ln1", "blocks/ln2"}
  assert report.bytes_per_device("blocks/fc") == 2 * 32 * 128 * 4 // 4
  specs, report = partition_specs(GPT_PARAMS, gpt.TP_RULES, {"fsdp": 2, "model": 4}, fsdp_axis="fsdp")
  assert specs["blocks"]["fc"] == P(None, "fsdp", "model")  # largest free dimension
  assert specs["wte"] == P("fsdp")
  assert specs["blocks"]["ln1"] == P()  # too small for FSDP
  assert "blocks/qkv" in report.table()


def _rule_error(call):
  with pytest.raises(RuleError) as err:
    call()
  return err.value


def test_malformed_rules_are_clear_errors_without_devices():
  mesh = {"data": 2, "model": 4}
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, [(r"fc$", ("model", "model"))], mesh))
  assert err.rule == "fc$" and "uses mesh axis 'model' more than once" in str(err)
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, [(r"fc$", (None, 1))], mesh))
  assert err.rule == "fc$" and "entry 1 (1) is not a mesh axis name" in str(err)
  assert _rule_error(lambda: partition_specs(GPT_PARAMS, [(r"[fc", (None, "model"))], mesh)).rule == "[fc"
  assert _rule_error(lambda: partition_specs(GPT_PARAMS, ["fc"], mesh)).rule == "fc"  # not a pair
  for bad in ({"model": 0}, {"model": -1}, {"model": 2.0}):  # a ZeroDivisionError, or accepted, before
    with pytest.raises(OptionError) as err:
      partition_specs(GPT_PARAMS, gpt.TP_RULES, bad)
    assert (err.value.name, err.value.got) == ("mesh", bad)
  with pytest.raises(OptionTypeError) as err:
    partition_specs(GPT_PARAMS, gpt.TP_RULES, ["model", 2])
  assert err.value.name == "mesh"
  for bad in ("1k", None, -1, True):  # raw comparison errors, before
    for name, call in (("fsdp_min_size", lambda: partition_specs(GPT_PARAMS, (), {"fsdp": 2}, fsdp_axis="fsdp",
                                                                  fsdp_min_size=bad)),
                       ("fsdp_min_size", lambda: jdist.sharded(gpt.loss_fn(gpt.GPTConfig()), optax.sgd(0.1),
                                                               jdist.make_mesh(fsdp=8), fsdp_axis="fsdp",
                                                               fsdp_min_size=bad)),
                       ("min_size", lambda: fsdp(gpt.loss_fn(gpt.GPTConfig()), optax.sgd(0.1), jdist.make_mesh(fsdp=8),
                                                 min_size=bad))):
      with pytest.raises(OptionError) as err:
        call()
      assert (err.value.name, err.value.got) == (name, bad)
  with pytest.raises(AxisError) as err:
    partition_specs(GPT_PARAMS, (), {"data": 2}, fsdp_axis="fsdp")
  assert err.value.axis == "fsdp" and err.value.mesh_axes == {"data": 2}


def test_rule_naming_an_axis_not_in_the_mesh():
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, gpt.TP_RULES, {"data": 8}))
  assert err.rule == "^blocks/qkv$"
  assert "names mesh axis 'model', but the mesh has axes {'data': 8}" in str(err)


def test_non_divisible_dimension_names_the_parameter():
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, gpt.TP_RULES, {"model": 3}))
  assert (err.rule, err.param) == ("^blocks/fc$", "blocks/fc")
  assert "dimension 2 (size 128) is sharded over ('model',) of sizes [3]" in str(err)


def test_conflicting_rules_name_the_parameter():
  rules = [("qkv", (None, "model")), ("blocks/(qkv|fc)", (None, None, "model"))]
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, rules, {"model": 2}))
  assert (err.rule, err.param) == ("qkv", "blocks/qkv") and "matched by rules with different specs" in str(err)


def test_equivalent_rules_agree_and_a_rule_matching_nothing_is_an_error():
  # P("model") and P("model", None) are the same layout
  specs, _ = partition_specs({"w": np.zeros((8, 4))}, [("w", ("model",)), ("^w$", ("model", None))], {"model": 2})
  assert specs["w"] == P("model")
  # a typo would leave the weights it meant replicated, silently
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, [("^block/qkv$", (None, None, None, "model")),
                                                         *gpt.TP_RULES[1:]], {"model": 2}))
  assert err.rule == ("^block/qkv$",) and "The parameter paths are: blocks/fc, blocks/ln1" in str(err)


def test_spec_longer_than_the_parameter():
  err = _rule_error(lambda: partition_specs(GPT_PARAMS, [("^lnf$", (None, None, "model"))], {"model": 2}))
  assert (err.rule, err.param) == ("^lnf$", "lnf") and "(3 entries) for parameter lnf of shape (32,)" in str(err)


def test_explain_sharding_prints_a_table(capsys):
  report = jdist.explain_sharding(GPT_PARAMS, gpt.TP_RULES, jdist.make_mesh(data=2, model=4))
  out = capsys.readouterr().out
  assert "blocks/qkv" in out and "bytes/device" in out and "replicated (no rule matched" in out
  assert report.specs["blocks/o"] == P(None, "model")


# ---- equivalence on 8 emulated devices ------------------------------------------------------------------

MESHES = [
    ({"data": 8}, {}, {}),
    ({"fsdp": 8}, {"fsdp_axis": "fsdp", "fsdp_min_size": 64}, {"fsdp_axis": "fsdp", "fsdp_min_size": 64}),
    ({"model": 8}, {"rules": gpt.TP_RULES}, {"rules": MLP_RULES}),
    ({"data": 2, "model": 4}, {"rules": gpt.TP_RULES}, {"rules": MLP_RULES}),
    ({"data": 2, "fsdp": 2, "model": 2}, {"rules": gpt.TP_RULES, "fsdp_axis": "fsdp", "fsdp_min_size": 64},
     {"rules": MLP_RULES, "fsdp_axis": "fsdp", "fsdp_min_size": 64}),
]


def _train(strategy, params, batches):
  state = strategy.init(params)
  specs = jax.tree.map(lambda x: x.sharding, state)
  for b in batches:
    state, m = strategy.step(state, strategy.shard_batch(b))
  after = jax.tree.map(lambda x: x.sharding, state)
  for a, b, x in zip(jax.tree.leaves(specs), jax.tree.leaves(after), jax.tree.leaves(state)):
    assert a.is_equivalent_to(b, x.ndim), (a, b)  # a step never changes the layout
  return state


@pytest.mark.parametrize("axes,gpt_kw,mlp_kw", MESHES, ids=lambda v: "x".join(f"{k}{n}" for k, n in v.items())
                         if isinstance(v, dict) and v and isinstance(next(iter(v.values())), int) else "")
def test_sharded_equals_single_device(axes, gpt_kw, mlp_kw):
  mesh = jdist.make_mesh(**axes)
  for params, loss, kw, batches, lr in ((GPT_PARAMS, gpt.loss_fn(CFG), gpt_kw, _gpt_batches(20), 1e-3),
                                        (MLP_PARAMS, mlp.loss, mlp_kw, _mlp_batches(20), 1e-2)):
    strategy = jdist.sharded(loss, optax.adam(lr), mesh, **kw)
    state = _train(strategy, params, batches)
    ref, ref_opt, _ = single_device_reference(loss, optax.adam(lr), params, batches)
    assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)
    # shard shapes are what the rules say
    specs, _ = partition_specs(params, kw.get("rules", ()), mesh, fsdp_axis=kw.get("fsdp_axis"),
                               fsdp_min_size=kw.get("fsdp_min_size", 1024))
    for leaf, spec in zip(jax.tree.leaves(state.params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
      expected = NamedSharding(mesh, spec).shard_shape(leaf.shape)
      assert leaf.sharding.shard_shape(leaf.shape) == expected


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_sharded_gpt_with_remat_equals_single_device_without(remat):
  # remat recomputes inside the sharded step (tensor parallel + FSDP): the same numbers as no remat
  cfg = gpt.GPTConfig(**{**CFG.__dict__, "remat": remat})
  batches = _gpt_batches(3)
  strategy = jdist.sharded(gpt.loss_fn(cfg), optax.adam(1e-3), jdist.make_mesh(data=2, fsdp=2, model=2),
                           rules=gpt.TP_RULES, fsdp_axis="fsdp", fsdp_min_size=64)
  state = _train(strategy, GPT_PARAMS, batches)
  ref, _, _ = single_device_reference(gpt.loss_fn(CFG), optax.adam(1e-3), GPT_PARAMS, batches)
  assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)


def test_explicit_fsdp_equals_single_device_and_moves_no_full_gradient():
  mesh = jdist.make_mesh(fsdp=8)
  batches = _gpt_batches(10)
  strategy = fsdp(gpt.loss_fn(CFG), optax.adam(1e-3), mesh, min_size=64)
  state = _train(strategy, GPT_PARAMS, batches)
  ref, _, _ = single_device_reference(gpt.loss_fn(CFG), optax.adam(1e-3), GPT_PARAMS, batches)
  assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)
  lowered = strategy.step.lower(state, strategy.shard_batch(batches[0]))
  sharded_bytes = sum(x.size * 4 for x in jax.tree.leaves(GPT_PARAMS) if x.size >= 64)
  n_sharded = sum(1 for x in jax.tree.leaves(GPT_PARAMS) if x.size >= 64)
  # the program gathers every sharded weight twice (forward, and again for backward: ZeRO-3) ...
  assert lowered.as_text().count("all_gather") == 2 * n_sharded
  report = jdist.comm_report(lowered)
  # ... XLA:CPU merges the second gather into the first: (N-1)/N P gathered + (N-1)/N P reduce-scattered
  np.testing.assert_allclose(report["all-gather"].sent_bytes, 7 / 8 * sharded_bytes, rtol=0.01)
  np.testing.assert_allclose(report["reduce-scatter"].sent_bytes, 7 / 8 * sharded_bytes, rtol=0.01)
  assert report["all-reduce"].payload_bytes < 0.02 * sharded_bytes  # only the small replicated leaves and the loss


@pytest.mark.parametrize("regather", [True, False])
def test_explicit_fsdp_with_sgd_equals_single_device(regather):
  # plain SGD shows the scale of every gradient (Adam would hide a replicated leaf's gradient being N x too
  # big); the norms and biases below min_size stay replicated
  mesh = jdist.make_mesh(fsdp=8)
  batches = _gpt_batches(5)
  strategy = fsdp(gpt.loss_fn(CFG), optax.sgd(0.5), mesh, min_size=64, regather=regather)
  state = strategy.init(GPT_PARAMS)
  state, metrics = strategy.step(state, strategy.shard_batch(batches[0]))
  grads = jax.grad(gpt.loss_fn(CFG))(GPT_PARAMS, batches[0])
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
  for batch in batches[1:]:
    state, _ = strategy.step(state, strategy.shard_batch(batch))
  ref, _, _ = single_device_reference(gpt.loss_fn(CFG), optax.sgd(0.5), GPT_PARAMS, batches)
  assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)


def test_fsdp_memory_per_device_is_an_eighth():
  mesh = jdist.make_mesh(fsdp=8)
  for strategy in (jdist.sharded(gpt.loss_fn(CFG), optax.adam(1e-2), mesh, fsdp_axis="fsdp", fsdp_min_size=64),
                   fsdp(gpt.loss_fn(CFG), optax.adam(1e-2), mesh, min_size=64)):
    state = strategy.init(GPT_PARAMS)
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                     for x in jax.tree.leaves((state.params, state.opt_state)))
    replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    assert per_device <= 1.1 * replicated / 8, (per_device, replicated / 8)
    compiled = strategy.step.lower(state, strategy.shard_batch(_gpt_batches(1)[0])).compile()
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args <= 1.1 * replicated / 8 + 16 * 17 * 4, (args, replicated / 8)  # plus the batch shard


def test_tp_mlp_in_shard_map_equals_unsharded_and_gspmd_with_one_forward_all_reduce():
  mesh = jdist.make_mesh(model=8)
  rng = np.random.default_rng(0)
  D = 16
  params = {"fc": jnp.asarray(rng.normal(size=(D, 4 * D)) / np.sqrt(D), jnp.float32),
            "proj": jnp.asarray(rng.normal(size=(4 * D, D)) / np.sqrt(4 * D), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(4, 8, D)), jnp.float32)
  specs = {"fc": P(None, "model"), "proj": P("model", None)}
  explicit = jax.shard_map(lambda p, x: tp_mlp(p, x, "model"), mesh=mesh, in_specs=(specs, P()), out_specs=P())
  plain = lambda p, x: jax.nn.gelu(x @ p["fc"]) @ p["proj"]
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  np.testing.assert_allclose(jax.jit(explicit)(placed, x), plain(params, x), rtol=1e-5, atol=1e-5)
  gspmd = jax.jit(plain)
  np.testing.assert_allclose(jax.jit(explicit)(placed, x), gspmd(placed, x), rtol=1e-5, atol=1e-5)
  loss = lambda f: (lambda p, x: jnp.sum(f(p, x) ** 2))
  g_explicit = jax.jit(jax.grad(loss(explicit), argnums=(0, 1)))(placed, x)
  g_plain = jax.grad(loss(plain), argnums=(0, 1))(params, x)
  assert_trees_all_close(g_explicit, g_plain, rtol=1e-5, atol=1e-5)
  forward = jdist.comm_report(jax.jit(explicit).lower(placed, x))
  assert forward["all-reduce"].count == 1 and forward["all-reduce"].payload_bytes == x.size * 4
  backward = jdist.comm_report(jax.jit(jax.grad(loss(explicit), argnums=(0, 1))).lower(placed, x))
  assert backward["all-reduce"].count == 2  # forward's, and the "f" operator's for dx
  gs = jdist.comm_report(gspmd.lower(placed, x))
  assert gs["all-reduce"].count == 1 and gs["all-reduce"].payload_bytes == x.size * 4


def test_gpt_tp_all_reduces_per_block_are_the_textbook_ones():
  """Megatron: per block, 2 all-reduces of B x S x D activations forward (attention, MLP), 4 per step."""
  mesh = jdist.make_mesh(model=8)
  strategy = jdist.sharded(gpt.loss_fn(CFG), optax.sgd(0.1), mesh, rules=gpt.TP_RULES)
  state = strategy.init(GPT_PARAMS)
  tokens = strategy.shard_batch(_gpt_batches(1)[0])
  act = 16 * CFG.seq_len * CFG.d_model * 4  # B x S x D floats
  L = CFG.n_layers  # the blocks run in a scan: comm_report multiplies the loop body by its trip count
  forward = jdist.comm_report(jax.jit(gpt.loss_fn(CFG)).lower(state.params, tokens))
  assert not forward.unknown_trip_counts
  assert forward.total_count == 2 * L and forward["all-reduce"].payload_bytes == 2 * L * act
  step = jdist.comm_report(strategy.step.lower(state, tokens))
  assert set(step.stats) == {"all-reduce"}
  assert 4 * L * act <= step["all-reduce"].payload_bytes <= 4 * L * act + 64  # plus a few scalars (loss)


def _partitioned_optimizer():
  # adam on the matrices, sgd on the rest: its state holds optax.MaskedNode where a part does not apply
  labels = lambda params: jax.tree.map(lambda x: "matrix" if x.ndim >= 2 else "vector", params)
  return optax.multi_transform({"matrix": optax.adam(1e-2), "vector": optax.sgd(0.1)}, labels)


def _muon_with_dimension_numbers():
  # the matrices' dimension numbers given explicitly: optax cannot run this init on its placeholder tree
  from optax.contrib import MuonDimensionNumbers, muon
  dims = lambda params: jax.tree.map(lambda x: MuonDimensionNumbers(0, 1) if x.ndim == 2 else None, params)
  return muon(1e-2, muon_weight_dimension_numbers=dims)


@pytest.mark.parametrize("opt_name", ["multi_transform", "adafactor", "sm3", "muon"])
def test_optimizers_with_masked_or_factored_state_shard_and_equal_single_device(opt_name):
  # adafactor's factored moments have other shapes than their parameters: they are replicated. sm3's
  # state (lists per parameter) and muon's given dimension numbers defeat optax's tree_map_params: their
  # state is placed by shape instead
  make = {"multi_transform": _partitioned_optimizer, "adafactor": lambda: optax.adafactor(1e-2),
          "sm3": lambda: optax.sm3(0.1), "muon": _muon_with_dimension_numbers}[opt_name]
  batches = _mlp_batches(5)
  ref, _, _ = single_device_reference(mlp.loss, make(), MLP_PARAMS, batches)
  for strategy in (jdist.sharded(mlp.loss, make(), jdist.make_mesh(data=2, fsdp=4), fsdp_axis="fsdp", fsdp_min_size=64),
                   jdist.sharded(mlp.loss, make(), jdist.make_mesh(data=4, model=2), rules=MLP_RULES),
                   fsdp(mlp.loss, make(), jdist.make_mesh(fsdp=8), min_size=64)):
    state = _train(strategy, MLP_PARAMS, batches)
    assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)


def test_sharded_splits_the_batch_over_a_tuple_of_data_axes_and_equals_single_device():
  batches = _mlp_batches(5)
  # the FSDP axis named as a data axis too splits the batch once over it
  for mesh, kw, rows in ((jdist.make_mesh(replica=2, data=4), {"data_axis": ("replica", "data")}, 2),
                         (jdist.make_mesh(data=4, devices=jax.devices()[:4]),
                          {"data_axis": "data", "fsdp_axis": "data", "fsdp_min_size": 64}, 4)):
    strategy = jdist.sharded(mlp.loss, optax.sgd(0.1), mesh, **kw)
    batch = strategy.shard_batch(batches[0])
    assert batch["x"].sharding.shard_shape(batch["x"].shape)[0] == rows, kw  # split, not replicated
    state = _train(strategy, MLP_PARAMS, batches)
    ref, _, _ = single_device_reference(mlp.loss, optax.sgd(0.1), MLP_PARAMS, batches)
    assert_trees_all_close(state.params, ref, rtol=1e-5, atol=1e-6)


def test_strategies_over_one_axis_reject_a_tuple():
  mesh = jdist.make_mesh(data=2, fsdp=4)
  with pytest.raises(ValueError, match=r"fsdp runs over one mesh axis, got axis=\('data', 'fsdp'\) \(2 names\)"):
    fsdp(mlp.loss, optax.sgd(0.1), mesh, axis=("data", "fsdp"))
  with pytest.raises(ValueError, match=r"pipeline runs over one mesh axis"):
    jdist.pipeline(lambda layer, x: x, lambda p, y, b: 0.0, optax.sgd(0.1), mesh, microbatches=2, axis=("data", "fsdp"))


def test_sharded_gpt_does_not_replicate_the_logits_gradient(capfd, monkeypatch):
  # the gradient of a gathered target logit is a scatter that GSPMD could not lay out like the softmax's on
  # data x FSDP x tensor (the vocabulary split over fsdp by the tied embedding), and it replicated the whole
  # logits' gradient, warning "Involuntary full rematerialization"; gpt.cross_entropy picks the logit by a
  # masked sum instead. The gathered version is the control: the warning is seen where it applies.
  cfg = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=1, n_heads=4)
  batch = jax.device_get(gpt.synthetic_tokens(jax.random.key(1), 32, cfg))

  def warnings():
    strategy = jdist.sharded(gpt.loss_fn(cfg), optax.adam(1e-3), jdist.make_mesh(data=2, fsdp=2, model=2),
                             rules=gpt.TP_RULES, fsdp_axis="fsdp")
    state = strategy.init(gpt.init(jax.random.key(0), cfg))
    capfd.readouterr()
    jax.block_until_ready(strategy.step(state, strategy.shard_batch(batch)))
    return "Involuntary full rematerialization" in capfd.readouterr().err

  assert not warnings()
  monkeypatch.setattr(gpt, "cross_entropy", lambda logits, targets: optax.softmax_cross_entropy_with_integer_labels(
      logits, targets).mean())
  assert warnings()


def test_gpt_cross_entropy_is_optax_s():
  logits = 5 * jax.random.normal(jax.random.key(0), (4, 16, 64))
  targets = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
  ref = lambda l: optax.softmax_cross_entropy_with_integer_labels(l, targets).mean()
  np.testing.assert_array_equal(gpt.cross_entropy(logits, targets), ref(logits))
  np.testing.assert_array_equal(jax.grad(gpt.cross_entropy)(logits, targets), jax.grad(ref)(logits))
  for bad in (64, -1):  # valid_tokens' mark of a bad id, and a negative one
    assert np.isnan(float(gpt.cross_entropy(logits, targets.at[0, 0].set(bad)))), bad


def test_aux_of_sharded_is_the_global_batch_s_and_of_fsdp_the_mean_over_devices():
  # sharded runs the loss once on the global batch: its aux is the single-device value; fsdp (shard_map)
  # reports the mean over the 8 devices of each device's value, as data_parallel does
  def loss(params, batch):
    return mlp.loss(params, batch), {"count": jnp.sum(batch["y"] > 3)}

  batch = _mlp_batches(1, batch=32)[0]
  count = int(np.sum(batch["y"] > 3))
  mesh = jdist.make_mesh(fsdp=8)
  for strategy, expected in ((jdist.sharded(loss, optax.sgd(0.1), mesh, fsdp_axis="fsdp", has_aux=True), count),
                             (fsdp(loss, optax.sgd(0.1), mesh, has_aux=True), count / 8)):
    _, metrics = strategy.step(strategy.init(MLP_PARAMS), strategy.shard_batch(batch))
    np.testing.assert_allclose(float(metrics["count"]), expected, rtol=1e-6)


def test_info_is_filled_at_construction_and_never_changes():
  # info is documented read-only: sharded used to add its specs to it while tracing, so its keys changed after init
  strategy = jdist.sharded(mlp.loss, optax.sgd(0.1), jdist.make_mesh(data=2, model=4), rules=MLP_RULES)
  before = dict(strategy.info)
  assert before == {"rules": tuple(MLP_RULES), "fsdp_axis": None, "fsdp_min_size": 1024, "batch_axes": ("data",)}
  state = strategy.init(MLP_PARAMS)
  strategy.step(state, strategy.shard_batch(_mlp_batches(1)[0]))
  assert dict(strategy.info) == before
  with pytest.raises(TypeError):
    strategy.info["rules"] = ()
  explicit = fsdp(mlp.loss, optax.sgd(0.1), jdist.make_mesh(fsdp=8), min_size=64, regather=False)
  assert dict(explicit.info) == {"fsdp_axis": "fsdp", "devices": 8, "min_size": 64, "regather": False}
