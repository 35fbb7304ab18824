"""Pipeline parallelism equals the same layers run in sequence on one device under every schedule; the bubble
is the table's; the 1F1B family's backward equals GPipe's, keeps no weights per micro-batch and, stashing
residuals, runs no forward twice (FLOPs); a stage and a loss that take keys draw what the layers in sequence
draw with the same keys."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jdist
from jdist.analysis import comm_report
from jdist.errors import AxisError, BatchError, OptionError, OptionTypeError
from jdist.models import gpt
from jdist.strategies.pipeline import (
  _gpipe,
  _residuals,
  _stage,
  device_layer_order,
  op_flops,
  pipeline,
  pipeline_schedule,
  unstack_params,
)
from tests.conftest import assert_trees_all_close, single_device_reference

W, D_IN, LAYERS = 8, 5, 8


def stage_fn(layer, x):
  return x + jnp.tanh(x @ layer["w"] + layer["b"])


def input_fn(params, batch):
  return batch["x"] @ params["w_in"]


def loss_fn(params, y, batch):
  return jnp.mean((y @ params["w_out"] - batch["y"]) ** 2)


def sequential_loss(params, batch):
  """The reference: the same layers, one after another, on one device."""
  x = input_fn(params, batch)
  x = jax.lax.scan(lambda h, layer: (stage_fn(layer, h), None), x, params["stages"])[0]
  return loss_fn(params, x, batch)


def make_params(layers=LAYERS, seed=0, width=W):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"stages": {"w": 0.5 * jax.random.normal(k[0], (layers, width, width)) / np.sqrt(width),
                     "b": 0.1 * jax.random.normal(k[1], (layers, width))},
          "w_in": jax.random.normal(k[2], (D_IN, width)) / np.sqrt(D_IN),
          "w_out": jax.random.normal(k[3], (width, 2)) / np.sqrt(width)}


def make_batches(steps, batch, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(batch, D_IN)).astype(np.float32), "y": rng.normal(size=(batch, 2)).astype(np.float32)}
          for _ in range(steps)]


def reference(params, batches, optimizer):
  params, _, losses = single_device_reference(sequential_loss, optimizer, params, batches)
  return params, losses


CASES = [(p, m, s, None) for p in (2, 4, 8) for s in ("gpipe", "circular") for m in (1, p, 4 * p)]
# 1F1B: m < p, m = p, m > p
CASES += [(p, m, "1f1b", None) for p, m in ((2, 1), (4, 2), (4, 4), (4, 16), (8, 8))]
# the newer schedules on p in {2, 4, 8} x m in {p, 2p, 4p} (their tables on a wider grid: test_pipeline_schedules.py)
CASES += [(p, m, s, None) for s in ("interleaved_1f1b", "zb_h1", "zbv") for p in (2, 4, 8) for m in (p, 2 * p, 4 * p)]
# interleaved zero bubble (v = 2), and remat: the stage inputs only (recomputed), the matmul outputs
CASES += [(4, 8, "zb_h1", {"repeats": 2}), (4, 4, "1f1b", {"remat": "nothing_saveable"}),
          (2, 4, "zb_h1", {"remat": jax.checkpoint_policies.dots_saveable}),
          (2, 4, "circular", {"remat": "nothing_saveable"})]


def layers_for(p, schedule, kw=None):
  """8 layers, or as many as the virtual stages when they are more; one layer per virtual stage for the
  1F1B family on 4+ devices (each layer is unrolled in the executor's branches: smaller programs)."""
  v = (kw or {}).get("repeats") or (2 if schedule in ("circular", "interleaved_1f1b", "zbv") else 1)
  if schedule in ("interleaved_1f1b", "zb_h1", "zbv") and p >= 4:
    return p * v
  return max(LAYERS, p * v)


@pytest.mark.parametrize("p,m,schedule,kw", CASES, ids=[f"p{p}-m{m}-{s}" + ("-" + "-".join(
    str(getattr(x, "__name__", x)) for x in kw.values()) if kw else "") for p, m, s, kw in CASES])
def test_pipeline_equals_sequential(p, m, schedule, kw):
  params = make_params(layers_for(p, schedule, kw))
  batches = make_batches(20, batch=4 * p * 2)
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-2), mesh, microbatches=m, schedule=schedule, input_fn=input_fn,
                      **(kw or {}))
  state = strategy.init(params)
  losses = []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  ref, ref_losses = reference(params, batches, optax.adam(1e-2))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), ref,
                         rtol=1e-5, atol=1e-6)
  sched = strategy.info["schedule"]
  np.testing.assert_allclose(float(metrics["bubble"]), sched.bubble, rtol=1e-6)  # counted while running


def test_data_x_pipe_mesh():
  params = make_params()
  batches = make_batches(20, batch=32)
  mesh = jdist.make_mesh(data=2, pipe=4)
  for schedule in ("gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"):
    strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-2), mesh, microbatches=4, schedule=schedule,
                        data_axis="data", input_fn=input_fn)
    state = strategy.init(params)
    for b in batches:
      state, metrics = strategy.step(state, strategy.shard_batch(b))
    ref, ref_losses = reference(params, batches, optax.adam(1e-2))
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[-1], rtol=1e-5)
    assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), ref,
                         rtol=1e-5, atol=1e-6)


SHAPE_AWARE = {  # optimizers whose update depends on each parameter's shape, not only its values
    "adafactor": optax.adafactor(1e-2, min_dim_size_to_factor=4),  # factors [S, W] and [S, W, W] leaves
    "adamw_ndim_mask": optax.adamw(1e-2, weight_decay=0.5, mask=lambda ps: jax.tree.map(lambda x: x.ndim == 3, ps)),
    "muon": optax.contrib.muon(1e-2),  # orthogonalised updates for 2-D leaves, Adam for the others
    "sm3": optax.sm3(0.1),  # one accumulator per axis of each leaf (its state also defeats tree_map_params)
}


@pytest.mark.parametrize("schedule,names", [("gpipe", tuple(SHAPE_AWARE)), ("circular", ("adafactor", "muon")),
                                            ("1f1b", ("adamw_ndim_mask", "sm3"))])
def test_shape_aware_optimizers_see_the_model_shapes(schedule, names):
  # the state keeps each leaf's shape, the layer axis split over the devices: an optimizer that factors,
  # masks or orthogonalises by shape trains as on one device (circular: the layers permuted, which these
  # optimizers do not see)
  params, batches = make_params(), make_batches(3, batch=16)
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  for name in names:
    opt = SHAPE_AWARE[name]
    strategy = pipeline(stage_fn, loss_fn, opt, mesh, microbatches=2, schedule=schedule, input_fn=input_fn)
    state = strategy.init(params)
    assert jax.tree.map(jnp.shape, state.params) == jax.tree.map(jnp.shape, params)
    for b in batches:
      state, metrics = strategy.step(state, strategy.shard_batch(b))
    ref, ref_losses = reference(params, batches, opt)
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[-1], rtol=1e-5, err_msg=name)
    assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), ref,
                           rtol=1e-5, atol=1e-6)


def test_an_optimizer_that_needs_the_loss_gets_the_step_s_mean_loss():
  # reduce_on_plateau reads update(..., value=loss): the mean over every micro-batch, as on one device
  opt = optax.chain(optax.sgd(0.05), optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=0.5))
  params, batches = make_params(), make_batches(6, batch=16)
  strategy = pipeline(stage_fn, loss_fn, opt, jdist.make_mesh(pipe=2, devices=jax.devices()[:2]), microbatches=2,
                      input_fn=input_fn)
  state = strategy.init(params)
  for b in batches:
    state, _ = strategy.step(state, strategy.shard_batch(b))
  ref, ref_opt, _ = single_device_reference(sequential_loss, opt, params, batches)
  assert float(ref_opt[1].scale) == 0.0625  # the plateau was met: the learning rate was halved 4 times
  assert_trees_all_close(jax.device_get(state.opt_state[1]), ref_opt[1], rtol=1e-5, atol=1e-6)
  assert_trees_all_close(jax.device_get(state.params), ref, rtol=1e-5, atol=1e-6)


def test_checkpoints_resume_only_into_the_layer_order_that_wrote_them(tmp_path):
  # GPipe and 1F1B keep the layers in the model's order: their checkpoints resume on any pipe size. A circular
  # one has the same shapes with the layers in device order: resuming it otherwise is refused, not scrambled
  from jdist.train import CheckpointConfig, CheckpointError
  params, batches = make_params(), make_batches(4, batch=16)
  make = lambda p, schedule, **kw: pipeline(stage_fn, loss_fn, optax.adam(1e-2), jdist.make_mesh(
      pipe=p, devices=jax.devices()[:p]), microbatches=2, schedule=schedule, input_fn=input_fn, **kw)
  ck = lambda name: CheckpointConfig(directory=tmp_path / name, every_steps=2)
  circular = make(2, "circular", repeats=2)
  jdist.fit(circular, circular.init(params), batches[:2], steps=2, checkpoint=ck("circular"))
  for other in (make(2, "gpipe"), make(4, "circular", repeats=1), make(2, "circular", repeats=4)):
    with pytest.raises(CheckpointError, match=r"keeps the stacked layers in another order \(schedule=circular, "
                                              r"pipe=2, repeats=2\) than this run"):
      jdist.fit(other, other.init(params), batches, steps=4, checkpoint=ck("circular"))
  # a Checkpointer used without fit checks the same: it must be told the layout it restores into
  from jdist.train import Checkpointer
  unaware = Checkpointer(ck("circular"))
  with pytest.raises(CheckpointError, match=r"a circular pipeline's order \(schedule=circular, pipe=2, repeats=2\), "
                                            r"and this Checkpointer was not told .*layer_layout=strategy.info"):
    unaware.restore_latest(make(2, "gpipe").init(params))
  unaware.close()
  raw = Checkpointer(ck("circular"), layer_layout=circular.info["layer_layout"])
  assert raw.restore_latest(circular.init(params))[0] == 2
  raw.close()
  # a Checkpointer not told the order records none (not "the model's order"): fit resumes what it saved
  state = circular.init(params)
  for b in batches[:2]:
    state, _ = circular.step(state, circular.shard_batch(b))
  own = Checkpointer(ck("own_loop"))
  own.save(2, state, {})
  own.close()
  assert jdist.fit(circular, circular.init(params), batches, steps=4, checkpoint=ck("own_loop")).start_step == 2
  resumed = jdist.fit(circular, circular.init(params), batches, steps=4, checkpoint=ck("circular"))
  assert resumed.start_step == 2
  assert make(1, "circular", repeats=2).info["layer_layout"] is None  # one device: the model's order
  gpipe2, gpipe4 = make(2, "gpipe"), make(4, "1f1b")
  jdist.fit(gpipe2, gpipe2.init(params), batches[:2], steps=2, checkpoint=ck("gpipe"))
  moved = jdist.fit(gpipe4, gpipe4.init(params), batches, steps=4, checkpoint=ck("gpipe"))  # 2 -> 4 devices
  assert moved.start_step == 2
  ref, _ = reference(params, batches, optax.adam(1e-2))
  for state, strategy in ((resumed.state, circular), (moved.state, gpipe4)):
    assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), ref,
                           rtol=1e-5, atol=1e-6)


def test_circular_keeps_each_device_s_virtual_stages_together():
  # p = 2, v = 2, 8 layers: virtual stages of 2 layers, stage j on device j mod 2
  order = device_layer_order(8, 2, 2)
  np.testing.assert_array_equal(order, [0, 1, 4, 5, 2, 3, 6, 7])
  np.testing.assert_array_equal(device_layer_order(8, 4, 1), np.arange(8))
  sched = pipeline_schedule(2, 2, "circular", repeats=2)
  params = make_params()
  laid_out = dict(params, stages=jax.tree.map(lambda x: x[order], params["stages"]))
  assert_trees_all_close(unstack_params(laid_out, sched), params, rtol=0, atol=0)
  with pytest.raises(OptionTypeError) as e:
    unstack_params(params, "circular")
  assert (e.value.name, e.value.got) == ("schedule", "circular")


def with_grads(optimizer):
  """``optimizer`` that also keeps each step's gradient, as the first entry of its state."""
  keep = optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda g, state, params=None: (g, g))
  return optax.chain(keep, optimizer)


def test_1f1b_gradients_equal_gpipe_and_sequential():
  p, m = 4, 3  # fewer micro-batches than stages, and 3 stash slots, not p
  params, batch = make_params(), make_batches(1, batch=24)[0]
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  grads, metrics = {}, {}
  for schedule in ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"):
    strategy = pipeline(stage_fn, loss_fn, with_grads(optax.sgd(0.1)), mesh, microbatches=m, schedule=schedule,
                        input_fn=input_fn)
    state, metrics[schedule] = strategy.step(strategy.init(params), strategy.shard_batch(batch))
    grads[schedule] = unstack_params(jax.device_get(state.opt_state[0]), strategy.info["schedule"])
  loss, ref = jax.value_and_grad(sequential_loss)(params, batch)
  for schedule in ("1f1b", "interleaved_1f1b", "zb_h1", "zbv"):
    assert_trees_all_close(grads[schedule], ref, rtol=1e-5, atol=1e-6)
    assert_trees_all_close(grads[schedule], grads["gpipe"], rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(float(metrics[schedule][key]), float(metrics["gpipe"][key]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["1f1b"]["bubble"]), float(metrics["gpipe"]["bubble"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["1f1b"]["loss"]), float(loss), rtol=1e-5)
  # the 1F1B table counts the backward ticks too: twice GPipe's forward ticks
  assert float(metrics["1f1b"]["ticks"]) == 2 * float(metrics["gpipe"]["ticks"]) == 2 * (m + p - 1)


@pytest.mark.parametrize("schedule,remat", [("gpipe", "full"), ("circular", "dots_saveable")])
def test_gpt_with_its_own_remat_equals_sequential(schedule, remat):
  # the stage's own jax.checkpoint (and its policy) nested in the pipeline's per-tick one: the same numbers
  cfg = gpt.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=4, n_heads=2)
  params = gpt.init(jax.random.key(0), cfg)
  batches = [jax.device_get(gpt.synthetic_tokens(jax.random.key(i), 16, cfg)) for i in range(3)]
  opt = optax.sgd(0.5, momentum=0.9)
  ref, _, ref_losses = single_device_reference(gpt.loss_fn(cfg), opt, params, batches)
  stage, head_loss, embed, to_pipeline = gpt.pipeline_fns(gpt.GPTConfig(**{**cfg.__dict__, "remat": remat}))
  strategy = pipeline(stage, head_loss, opt, jdist.make_mesh(pipe=2, devices=jax.devices()[:2]), microbatches=4,
                      schedule=schedule, input_fn=embed)
  state, losses = strategy.init(to_pipeline(params)), []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), to_pipeline(ref),
                         rtol=1e-5, atol=1e-6)


# 1F1B with the GPT's dots_saveable inside and jdist's stage-input stash over it; ZB-V stashing residuals;
# ZB-H1 with the GPT's full remat (its checkpoint inlined, then split in B and W)
GPT_CASES = [("1f1b", 4, 8, "dots_saveable", "nothing_saveable"), ("zbv", 2, 4, "none", None),
             ("zb_h1", 4, 4, "full", None)]


@pytest.mark.parametrize("schedule,p,m,gpt_remat,remat", GPT_CASES,
                         ids=[f"{s}-p{p}-m{m}-{g}-{r}" for s, p, m, g, r in GPT_CASES])
def test_1f1b_family_gpt_equals_sequential(schedule, p, m, gpt_remat, remat):
  # the embedding runs on the first stage and the tied head on the last: wte's gradient is the sum of both;
  # attention, layer norms and GELU go through the layer's VJP taken apart (and split in B and W for ZB),
  # with the GPT's own jax.checkpoint inside (gpt_remat) and jdist's remat policy over it
  cfg = gpt.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=4, n_heads=2)
  params = gpt.init(jax.random.key(0), cfg)
  batches = [jax.device_get(gpt.synthetic_tokens(jax.random.key(i), 16, cfg)) for i in range(3)]
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  # SGD with momentum, not Adam: Adam divides by |g|, so rounding in near-zero gradient entries (~1e-9
  # here, for GPipe too) would move those parameters by up to its learning rate
  opt = with_grads(optax.sgd(0.5, momentum=0.9))
  ref, ref_opt, ref_losses = single_device_reference(gpt.loss_fn(cfg), opt, params, batches)
  stage, head_loss, embed, to_pipeline = gpt.pipeline_fns(gpt.GPTConfig(**{**cfg.__dict__, "remat": gpt_remat}))
  strategy = pipeline(stage, head_loss, opt, mesh, microbatches=m, schedule=schedule, input_fn=embed, remat=remat)
  state = strategy.init(to_pipeline(params))
  losses = []
  for b in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # the last step's gradient, and the parameters after 3 steps
  sched = strategy.info["schedule"]
  assert_trees_all_close(unstack_params(jax.device_get(state.opt_state[0]), sched), to_pipeline(ref_opt[0]),
                         rtol=1e-5, atol=1e-7)
  assert_trees_all_close(unstack_params(jax.device_get(state.params), sched), to_pipeline(ref), rtol=1e-5, atol=1e-6)


def test_1f1b_family_memory_does_not_grow_with_microbatches():
  # XLA's temporary buffers per device, micro-batches of 16 rows x 64 features (4 KiB each), p = 4
  width, rows, p = 64, 16, 4
  params, act_bytes = make_params(width=width), rows * width * 4
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  temp = {}
  for schedule, remat in (("gpipe", None), ("1f1b", None), ("1f1b", "nothing_saveable"), ("zbv", None)):
    for m in (8, 32):  # zbv reaches its peak from m = 2p - 1
      strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule, input_fn=input_fn,
                          remat=remat)
      batch = strategy.shard_batch(make_batches(1, batch=rows * m)[0])
      compiled = strategy.step.lower(strategy.init(params), batch).compile()
      temp[schedule, remat, m] = compiled.memory_analysis().temp_size_in_bytes
  # GPipe keeps every micro-batch's activations for the backward; the 1F1B family at most p micro-batches'
  # (2p half stages for zbv), whatever m
  assert temp["gpipe", None, 32] - temp["gpipe", None, 8] >= (32 - 8) * act_bytes, temp
  for schedule, remat in (("1f1b", None), ("1f1b", "nothing_saveable"), ("zbv", None)):
    assert temp[schedule, remat, 32] - temp[schedule, remat, 8] < act_bytes, (schedule, remat, temp)
    assert temp[schedule, remat, 32] < temp["gpipe", None, 32] / 2, (schedule, remat, temp)
  # residuals (the tanh outputs too) take more than the stage inputs alone
  assert temp["1f1b", "nothing_saveable", 32] < temp["1f1b", None, 32], temp


def test_residual_stashing_runs_no_forward_twice():
  # FLOPs per device of one op of a middle stage, from XLA's cost analysis of each op compiled alone
  # (the compiled step's own count takes the tick loop's body once and each lax.switch's costliest branch)
  width, rows, p, m = 128, 32, 4, 8
  params = make_params(layers=p, width=width)
  batch = make_batches(1, batch=rows * m)[0]
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  forward = 2 * rows * width * width  # one layer's matmul (its elementwise ops add ~5%)
  flops = {}
  for schedule, remat in (("gpipe", None), ("1f1b", None), ("1f1b", "nothing_saveable"), ("zb_h1", None)):
    strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule, input_fn=input_fn,
                        remat=remat)
    flops[schedule, remat] = op_flops(strategy, jax.eval_shape(strategy.init, params), strategy.shard_batch(batch))
  total = {k: sum(v.values()) for k, v in flops.items()}
  # GPipe: a forward and its backward (2 forwards' worth); 1F1B stashing residuals: the same, within 5%
  assert flops["gpipe", None]["F"] == pytest.approx(forward, rel=0.1)
  assert total["gpipe", None] == pytest.approx(3 * forward, rel=0.1)
  assert total["1f1b", None] == pytest.approx(total["gpipe", None], rel=0.05)
  # stashing the stage input only, B runs the forward again: 4 forwards' worth
  assert flops["1f1b", "nothing_saveable"]["B"] == pytest.approx(3 * forward, rel=0.1)
  assert total["1f1b", "nothing_saveable"] == pytest.approx(4 / 3 * total["gpipe", None], rel=0.05)
  # ZB-H1 splits the backward into B and W of a forward's worth each, nothing recomputed
  assert flops["zb_h1", None]["B"] == pytest.approx(forward, rel=0.1)
  assert flops["zb_h1", None]["W"] == pytest.approx(forward, rel=0.1)
  assert total["zb_h1", None] == pytest.approx(total["gpipe", None], rel=0.05)


def bf16_matmul_stage(layer, x):  # casts its weights inside, as a mixed-precision stage does
  h = (x.astype(jnp.bfloat16) @ layer["w"].astype(jnp.bfloat16)).astype(x.dtype)
  return x + jnp.tanh(h + layer["b"])


@pytest.mark.parametrize("schedule,repeats,stage", [("gpipe", 1, stage_fn), ("circular", 2, stage_fn),
                                                    ("1f1b", 1, stage_fn), ("gpipe", 1, bf16_matmul_stage),
                                                    ("circular", 2, bf16_matmul_stage)],
                         ids=["gpipe", "circular", "1f1b", "gpipe-bf16-cast", "circular-bf16-cast"])
def test_memory_grows_with_microbatches_by_activations_not_weights(schedule, repeats, stage):
  # one 512 x 512 layer per virtual stage (1 MiB per layer), 1-row micro-batches (2 KiB activations), p = 4.
  # GPipe and circular used to keep a copy of each device's stage weights per tick: temporary memory grew
  # by 1.008 MiB per micro-batch for GPipe and 2.018 MiB for circular (v = 2); a stage that casts its
  # weights would add the casts' copies (1.5 MiB per micro-batch for GPipe without the recompute policy)
  width, p = 512, 4
  params = make_params(layers=p * repeats, width=width)
  act_bytes = width * 4
  weight_bytes = repeats * (width * width + width) * 4  # one device's layers
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  temp = {}
  for m in (4, 32):
    strategy = pipeline(stage, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule,
                        repeats=repeats if schedule == "circular" else None, input_fn=input_fn)
    batch = strategy.shard_batch(make_batches(1, batch=m)[0])
    temp[m] = strategy.step.lower(strategy.init(params), batch).compile().memory_analysis().temp_size_in_bytes
  per_micro_batch = (temp[32] - temp[4]) / (32 - 4)
  # a few activations saved per stage a micro-batch passes (input, pre-activation, output), no weights
  assert per_micro_batch <= 8 * act_bytes * repeats, (per_micro_batch, temp)
  assert per_micro_batch < 0.05 * weight_bytes, (per_micro_batch, temp)


@pytest.mark.parametrize("schedule,remat", [("zbv", None), ("1f1b", "dots_saveable")])
def test_the_1f1b_family_stashes_no_weights(schedule, remat):
  # the stash is per micro-batch in flight (2p slots for zbv): a stage that casts its weights to bf16 keeps
  # x @ w's residual w (cast) out of it; one 512 x 512 layer per virtual stage, 1-row micro-batches
  width, p, m = 512, 4, 16
  v = 2 if schedule == "zbv" else 1
  params = make_params(layers=p * v, width=width)
  stage_bytes = (width * width + width) * 4  # one layer, f32
  layer = jax.tree.map(lambda a: a[0], params["stages"])
  policy = None if remat is None else getattr(jax.checkpoint_policies, remat)
  vjp = _residuals.layer_vjp(lambda w, aux, x: bf16_matmul_stage(w, x), layer, None, jnp.zeros((1, width)), policy)
  assert all(t.shape[-1] == width and np.prod(t.shape) == width for t in vjp.stash_types), vjp.stash_types
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  strategy = pipeline(bf16_matmul_stage, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule,
                      input_fn=input_fn, remat=remat)
  slots = strategy.info["schedule"].peak_stash.max()
  temp = strategy.step.lower(strategy.init(params), strategy.shard_batch(make_batches(1, batch=m)[0])).compile(
  ).memory_analysis().temp_size_in_bytes
  # the gradient sums and copies of them through the tick's branches (3 layers' worth), not a cast per slot
  assert slots >= 4 and temp < 4 * v * stage_bytes, (temp, slots)


# ---- bad input -----------------------------------------------------------------------------------------


def test_batch_not_divisible_into_microbatches():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=4, devices=jax.devices()[:4]),
                      microbatches=8, input_fn=input_fn)
  with pytest.raises(BatchError) as e:
    strategy.shard_batch(make_batches(1, 12)[0])
  assert (e.value.multiple_of, e.value.sizes) == (8, {"['x']": 12, "['y']": 12})
  with pytest.raises(BatchError) as e:  # a nan loss, and a step taken
    strategy.shard_batch(jax.tree.map(lambda x: x[:0], make_batches(1, 8)[0]))
  assert (e.value.multiple_of, e.value.sizes["['x']"]) == (8, 0)


def test_layers_not_divisible_by_the_pipe_axis():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=4, devices=jax.devices()[:4]),
                      microbatches=4, schedule="circular", input_fn=input_fn)
  with pytest.raises(ValueError, match=r"6 stacked layers cannot be split into 4 pipeline devices x 2 virtual stages"):
    strategy.init(make_params(layers=6))


def test_stage_params_not_stacked():
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=2, devices=jax.devices()[:2]),
                      input_fn=input_fn)
  bad = make_params()
  bad["stages"]["b"] = bad["stages"]["b"][:3]
  with pytest.raises(ValueError,
                     match=r"every leaf with the same leading \(layer\) size; got leading sizes \['3', '8'\]"):
    strategy.init(bad)
  with pytest.raises(ValueError, match=r"must be a dict with a 'stages' entry"):
    strategy.init({"layers": make_params()["stages"]})
  with pytest.raises(OptionError) as e:
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), jdist.make_mesh(pipe=2, devices=jax.devices()[:2]),
             schedule="zero-bubble")
  assert (e.value.name, e.value.got) == ("schedule", "zero-bubble") and "'zb_h1'" in e.value.expected


def test_1f1b_has_no_virtual_stages():
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  with pytest.raises(OptionError) as e:
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, schedule="1f1b", repeats=2)
  assert (e.value.name, e.value.got) == ("repeats", 2) and "schedule='circular'" in str(e.value)
  with pytest.raises(OptionError) as e:
    pipeline_schedule(4, 8, "1f1b", repeats=3)
  assert (e.value.name, e.value.got) == ("repeats", 3)
  assert pipeline_schedule(4, 8, "1f1b", repeats=1).ticks == 22


def test_1f1b_sends_what_gpipe_sends():
  # each tick a 1F1B device sends an activation on or a cotangent back, never both: one ppermute per tick
  p, m = 4, 4
  params, batch = make_params(), make_batches(1, batch=32)[0]
  mesh = jdist.make_mesh(pipe=p, devices=jax.devices()[:p])
  reports = {}
  for schedule in ("gpipe", "1f1b"):
    strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=m, schedule=schedule, input_fn=input_fn)
    state = strategy.init(params)
    reports[schedule] = comm_report(strategy.step.lower(state, strategy.shard_batch(batch)))
  act_bytes = (32 // m) * W * 4  # one micro-batch's activations, f32
  permute = reports["1f1b"]["collective-permute"]
  assert permute.count == 2 * (m + p - 1)  # the loop's trip count times one
  assert permute.sent_bytes == 2 * (m + p - 1) * act_bytes
  assert reports["1f1b"].total_sent_bytes == pytest.approx(reports["gpipe"].total_sent_bytes, rel=1e-6)


def _loss_with_aux(params, y, batch):
  out = y @ params["w_out"]
  return loss_fn(params, y, batch), {"mean_output": jnp.mean(out), "positives": jnp.sum(out > 0)}


@pytest.mark.parametrize("schedule,p,m,data", [("gpipe", 4, 4, 1), ("circular", 2, 4, 2), ("1f1b", 4, 8, 1),
                                               ("1f1b", 2, 2, 2)])
def test_aux_is_the_mean_over_micro_batches_and_training_is_unchanged(schedule, p, m, data):
  params = make_params()
  batches = make_batches(3, batch=4 * p * data * 2)
  axes = dict(data=data, pipe=p) if data > 1 else dict(pipe=p)
  mesh = jdist.make_mesh(**axes, devices=jax.devices()[:p * data])
  kw = dict(microbatches=m, schedule=schedule, input_fn=input_fn, data_axis="data" if data > 1 else None)
  with_aux = pipeline(stage_fn, _loss_with_aux, optax.adam(1e-2), mesh, has_aux=True, **kw)
  plain = pipeline(stage_fn, loss_fn, optax.adam(1e-2), mesh, **kw)
  state_a, state_p = with_aux.init(params), plain.init(params)
  for b in batches:
    params_before = unstack_params(jax.device_get(state_a.params), with_aux.info["schedule"])
    state_a, metrics = with_aux.step(state_a, with_aux.shard_batch(b))
    state_p, metrics_p = plain.step(state_p, plain.shard_batch(b))
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics_p["loss"]), rtol=1e-6)
    # the reference: each of the data x m micro-batches run through the layers in sequence, averaged
    parts = [jax.tree.map(lambda x: x.reshape(data * m, -1, *x.shape[1:])[i], b) for i in range(data * m)]

    def aux_of(batch):
      x = input_fn(params_before, batch)
      y = jax.lax.scan(lambda h, layer: (stage_fn(layer, h), None), x, params_before["stages"])[0]
      return _loss_with_aux(params_before, y, batch)[1]

    expected = jax.tree.map(lambda *a: np.mean(np.asarray(a, np.float64)), *[aux_of(part) for part in parts])
    np.testing.assert_allclose(float(metrics["mean_output"]), expected["mean_output"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["positives"]), expected["positives"], rtol=1e-6)
  assert_trees_all_close(state_a.params, state_p.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_activations_that_break_the_stage_contract_are_clear_errors(schedule):
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  params, batch = make_params(), make_batches(1, batch=8)[0]
  make = lambda stage=stage_fn, inp=input_fn: pipeline(stage, loss_fn, optax.sgd(0.1), mesh, microbatches=2,
                                                        schedule=schedule, input_fn=inp)
  wider = lambda layer, x: jnp.concatenate([stage_fn(layer, x), x], -1)
  halved = lambda layer, x: stage_fn(layer, x).astype(jnp.bfloat16)
  for stage, got in ((wider, r"float32\[4, 16\]"), (halved, r"bfloat16\[4, 8\]")):
    strategy = make(stage)
    with pytest.raises(TypeError, match=r"input_fn returned float32\[4, 8\], stage_fn " + got):
      strategy.step(strategy.init(params), strategy.shard_batch(batch))
  strategy = make(inp=lambda params, batch: (input_fn(params, batch), batch["x"]))
  with pytest.raises(TypeError, match=r"must be one array .* input_fn returned PyTreeDef\(\(\*, \*\)\)"):
    strategy.step(strategy.init(params), strategy.shard_batch(batch))
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=2, schedule=schedule)
  with pytest.raises(BatchError, match=r"The default input_fn reads batch\['x'\], but the batch has \['inputs', 'y'\]"):
    strategy.step(strategy.init(params), strategy.shard_batch({"inputs": batch["x"], "y": batch["y"]}))
  with pytest.raises(AxisError) as e:
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, data_axis="pipe")
  assert e.value.axis == "pipe"


def test_a_loss_that_is_not_a_scalar_is_a_clear_error():
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  batch = make_batches(1, batch=8)[0]
  per_example = lambda params, y, batch: jnp.mean((y @ params["w_out"] - batch["y"]) ** 2, axis=-1)
  strategy = pipeline(stage_fn, per_example, optax.sgd(0.1), mesh, microbatches=2, input_fn=input_fn)
  with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* returned shape \(4,\)"):
    strategy.step(strategy.init(make_params()), strategy.shard_batch(batch))
  strategy = pipeline(stage_fn, _loss_with_aux, optax.sgd(0.1), mesh, microbatches=2, input_fn=input_fn)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    strategy.step(strategy.init(make_params()), strategy.shard_batch(batch))


@pytest.mark.parametrize("schedule", ["gpipe", "circular", "1f1b"])
def test_idle_ticks_do_not_poison_the_gradient(schedule):
  # a stage that normalises without an epsilon is finite on real activations but has an infinite
  # derivative at the zeros an idle tick would hold: idle ticks must compute nothing, not mask a result
  def normalising_stage(layer, x):
    h = x @ layer["w"]
    return h / jnp.sqrt(jnp.sum(h * h, -1, keepdims=True))

  def seq_loss(params, batch):
    x = jax.lax.scan(lambda h, layer: (normalising_stage(layer, h), None), input_fn(params, batch),
                     params["stages"])[0]
    return loss_fn(params, x, batch)

  params, batch = make_params(layers=4), make_batches(1, 8)[0]
  loss, grads = jax.value_and_grad(seq_loss)(params, batch)
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  strategy = pipeline(normalising_stage, loss_fn, optax.sgd(0.1), mesh, microbatches=2, schedule=schedule,
                      input_fn=input_fn)
  state, metrics = strategy.step(strategy.init(params), strategy.shard_batch(batch))
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-5)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), expected,
                         rtol=1e-5, atol=1e-6)


def test_an_aux_key_named_like_a_pipeline_metric_is_an_error():
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  strategy = pipeline(stage_fn, lambda params, y, batch: (loss_fn(params, y, batch), {"bubble": 0.0}), optax.sgd(0.1),
                      mesh, microbatches=2, input_fn=input_fn, has_aux=True)
  with pytest.raises(ValueError, match=r"\['bubble'\], which would overwrite"):
    strategy.step(strategy.init(make_params(layers=2)), strategy.shard_batch(make_batches(1, 8)[0]))


def dropout_stage(layer, x, key):
  return stage_fn(layer, x) * jax.random.bernoulli(key, 0.75, x.shape) / 0.75


def dropout_loss(params, y, batch, key):
  return loss_fn(params, y * jax.random.bernoulli(key, 0.9, y.shape) / 0.9, batch)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zbv"])
def test_a_stage_and_a_loss_that_take_keys_draw_what_the_layers_in_sequence_draw(schedule):
  # data=2 x pipe=2, m=2: piece s = r m + i of the global batch gets shard_key(state.key, step, s), the loss
  # that key and model layer l fold_in(key, l) (zbv keeps layers 0 and 3 on device 0)
  layers = 4
  params, batches = make_params(layers), make_batches(3, batch=16)
  mesh = jdist.make_mesh(data=2, pipe=2, devices=jax.devices()[:4])
  strategy = pipeline(jdist.takes_key(dropout_stage), jdist.takes_key(dropout_loss), optax.sgd(0.01), mesh,
                      microbatches=2, schedule=schedule, data_axis="data", input_fn=input_fn)
  state = strategy.init(params, key=7)
  key_data = jax.device_get(state.key)

  def reference_loss(params, batch, step):
    pieces = jax.tree.map(lambda a: a.reshape(4, -1, *a.shape[1:]), batch)
    losses = []
    for shard in range(4):
      piece, key = jax.tree.map(lambda a: a[shard], pieces), jdist.shard_key(key_data, step, shard)
      x = input_fn(params, piece)
      for layer in range(layers):
        x = dropout_stage(jax.tree.map(lambda a: a[layer], params["stages"]), x, jax.random.fold_in(key, layer))
      losses.append(dropout_loss(params, x, piece, key))
    return jnp.mean(jnp.stack(losses))

  ref, value_and_grad = params, jax.jit(jax.value_and_grad(reference_loss))
  for step, b in enumerate(batches):
    loss, grads = value_and_grad(ref, b, step)
    ref = jax.tree.map(lambda p, g: p - 0.01 * g, ref, grads)
    state, metrics = strategy.step(state, strategy.shard_batch(b))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  assert_trees_all_close(unstack_params(jax.device_get(state.params), strategy.info["schedule"]), ref, rtol=1e-5,
                         atol=1e-6)
  # the masks matter: without them the first loss would differ
  assert abs(float(value_and_grad(params, batches[0], 0)[0]) - float(sequential_loss(params, batches[0]))) > 1e-3
  assert strategy.info["schedule"].stage_ids.tolist() == ([[0, 3], [1, 2]] if schedule == "zbv" else [[0], [1]])


def test_the_pipeline_configs_build_their_schedules():
  import pathlib

  from jdist import config as config_lib
  from jdist import experiment
  expected = {"pipeline": ("gpipe", 8), "pipeline_interleaved": ("interleaved_1f1b", 4), "pipeline_zb": ("zb_h1", 8),
              "pipeline_zbv": ("zbv", 4)}
  for path in sorted((pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs").glob("pipeline*.toml")):
    cfg = config_lib.load(path)
    mesh = jdist.make_mesh(**cfg.mesh.axes, devices=jax.devices()[:cfg.mesh.num_devices or None])
    stages = experiment._model(cfg).pipeline  # the residual MLP's layers
    strategy = experiment.build_strategy(cfg.strategy.name, stages, optax.sgd(0.1), mesh, dict(cfg.strategy.options))
    sched = strategy.info["schedule"]
    assert (sched.name, sched.num_stages) == expected[path.stem], path.name
  cfg = config_lib.load(path, ["strategy.remat=nothing_saveable"])
  strategy = experiment.build_strategy(cfg.strategy.name, stages, optax.sgd(0.1), mesh, dict(cfg.strategy.options))
  assert strategy.info["config"].remat is jax.checkpoint_policies.nothing_saveable


# ---- the pieces, alone ------------------------------------------------------------------------------------


def test_info_is_filled_at_construction_and_read_only():
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  strategy = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=4, schedule="circular", input_fn=input_fn)
  assert strategy.info["schedule"].ticks == pipeline_schedule(2, 4, "circular").ticks
  assert strategy.info["layer_layout"] == {"schedule": "circular", "pipe": 2, "repeats": 2}
  # interleaved schedules keep circular's layer order (their checkpoints resume into each other); zbv a V
  for schedule, layout in (("interleaved_1f1b", "circular"), ("zbv", "zbv")):
    other = pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, microbatches=4, schedule=schedule)
    assert other.info["layer_layout"] == {"schedule": layout, "pipe": 2, "repeats": 2}
  assert pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, schedule="zb_h1").info["layer_layout"] is None
  np.testing.assert_array_equal(device_layer_order(8, 2, 2, pipeline_schedule(2, 2, "zbv").stage_ids),
                                [0, 1, 6, 7, 2, 3, 4, 5])
  with pytest.raises(TypeError):
    strategy.info["schedule"] = None


def test_gate_passes_the_cotangent_only_where_working():
  # 1 / |x| has an infinite derivative at 0: the idle entry's cotangent is an exact zero, not 0 * inf = NaN
  f = lambda x, working: jnp.sum(jax.lax.select_n(working, 0.0, 1 / jnp.abs(_gpipe.gate(working, x))))
  for working, expected in ((True, -1.0), (False, 0.0)):
    np.testing.assert_array_equal(jax.grad(f)(jnp.float32(1.0 if working else 0.0), working), expected)


def test_weights_only_policy_recomputes_what_has_only_parameter_shapes():
  params = {"stages": {"w": jnp.zeros((4, 3, 3)), "b": jnp.zeros((4, 3))}, "w_out": jnp.zeros((3, 2))}
  saveable = _gpipe.weights_only(params, v=2)
  aval = lambda *shape: jax.core.ShapedArray(shape, jnp.float32)
  for shapes in [(4, 3, 3), (2, 3, 3), (3, 3), (3,), (3, 2), ()]:  # device's layers, a lap's, a layer, w_out, none
    assert not saveable(jax.lax.convert_element_type_p, aval(*shapes)), shapes
  assert not saveable(jax.lax.dot_general_p, aval(3, 3), aval(3, 2))  # weights only
  assert saveable(jax.lax.dot_general_p, aval(5, 3), aval(3, 3))  # an activation [5, 3] times a weight
  assert saveable(jax.lax.tanh_p, aval(5, 3))


def test_config_checks_its_callables():
  with pytest.raises(OptionTypeError) as e:
    _stage.PipelineConfig(stage_fn=stage_fn, loss_fn="mse", schedule=pipeline_schedule(2, 2))
  assert e.value.name == "loss_fn"
  mesh = jdist.make_mesh(pipe=2, devices=jax.devices()[:2])
  with pytest.raises(OptionError) as e:
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, remat="full")
  assert (e.value.name, e.value.got) == ("remat", "full") and "'nothing_saveable'" in e.value.expected
  with pytest.raises(OptionTypeError) as e:
    pipeline(stage_fn, loss_fn, optax.sgd(0.1), mesh, remat=3)
  assert e.value.name == "remat"


def test_a_layer_vjp_taken_apart_equals_jax_vjp():
  # the forward, the backward, and the backward split in B and W, against jax.vjp; what each remat stashes
  layer = jax.tree.map(lambda a: a[0], make_params(width=16)["stages"])
  x, g = (jax.random.normal(jax.random.key(k), (4, 16)) for k in (1, 2))
  y_ref, pullback = jax.vjp(stage_fn, layer, x)
  g_ref = pullback(g)
  stashed = {}
  for name in (None, "dots_saveable", "nothing_saveable"):
    remat = None if name is None else getattr(jax.checkpoint_policies, name)
    vjp = _residuals.layer_vjp(lambda w, aux, x: stage_fn(w, x), layer, None, x, remat)
    y, stash = vjp.forward(layer, None, x)
    g_x, carry = vjp.input_grad(layer, None, stash, g)
    for got in (vjp.backward(layer, None, stash, g), (vjp.weight_grad(layer, None, stash, carry), g_x)):
      assert_trees_all_close((y, *got), (y_ref, *g_ref), rtol=1e-6, atol=1e-6)
    stashed[name] = len(stash)
    assert [t.shape for t in vjp.carry_types] == [(4, 16)]  # W needs the pre-activation's cotangent only
  # everything (x, tanh's output, 1 - tanh's output), x and the matmul's output, x alone
  assert stashed == {None: 3, "dots_saveable": 2, "nothing_saveable": 1}
