"""Equivalence under any pytree: hypothesis draws parameter trees, batches, device counts and optimizers,
and every strategy must take the steps plain optax takes on one device.

The draws vary structure, not only size: 1 to 7 parameter leaves nested in dicts, lists, tuples and
NamedTuples (or a bare array), scalars and odd shapes (7, 13x3, 2x5x11), float32 and bfloat16 leaves;
batches as a bare array, a tuple, a dict or nested, 1 to 4 leaves; 1, 2, 3, 4 or 8 devices; SGD and Adam.
The loss touches every parameter and batch leaf, per example, so a leaf mapped or split wrongly changes
the numbers.

The examples are derandomized and bounded (tests/conftest.py registers the hypothesis profiles): CI runs
the same few structures every time; ``HYPOTHESIS_PROFILE=explore`` draws many more, at random.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jdist
from jdist.strategies.model_parallel import path_str
from jdist.strategies.pipeline import unstack_params
from tests.conftest import single_device_reference

LEAF_SHAPES = [(), (1,), (7,), (4,), (13, 3), (2, 5, 11), (8, 4), (3, 1, 2)]
FEATURE_SHAPES = [(), (3,), (2, 2), (5,)]
STEPS = 3


class Pair(NamedTuple):
  first: Any
  second: Any


class Single(NamedTuple):
  only: Any


class Triple(NamedTuple):
  a: Any
  b: Any
  c: Any


NAMED = {1: Single, 2: Pair, 3: Triple}


@st.composite
def nested(draw, leaves: list, depth: int = 0):
  """``leaves`` (in order) arranged in a drawn tree of dicts, lists, tuples and NamedTuples."""
  if len(leaves) == 1 and (depth >= 2 or draw(st.booleans())):
    return leaves[0]
  groups = draw(st.integers(1, min(3, len(leaves))))
  cuts = sorted(draw(st.lists(st.integers(1, len(leaves) - 1), min_size=groups - 1, max_size=groups - 1,
                              unique=True))) if groups > 1 and len(leaves) > 1 else []
  parts = [leaves[a:b] for a, b in zip([0, *cuts], [*cuts, len(leaves)])]
  children = [draw(nested(part, depth + 1)) for part in parts]
  kind = draw(st.sampled_from(["dict", "list", "tuple", "named"]))
  if kind == "dict":
    return {f"k{i}": child for i, child in enumerate(children)}
  if kind == "list":
    return list(children)
  if kind == "tuple":
    return tuple(children)
  return NAMED[len(children)](*children)


@st.composite
def param_trees(draw, max_leaves: int = 7, bf16: bool = True):
  """A pytree of 1..max_leaves float arrays of drawn shapes and dtypes (values from a drawn seed)."""
  n = draw(st.integers(1, max_leaves))
  shapes = [draw(st.sampled_from(LEAF_SHAPES)) for _ in range(n)]
  dtypes = [draw(st.sampled_from([jnp.float32, jnp.bfloat16] if bf16 else [jnp.float32])) for _ in range(n)]
  keys = jax.random.split(jax.random.key(draw(st.integers(0, 2**16))), n)
  leaves = [(0.5 * jax.random.normal(k, s)).astype(d) for k, s, d in zip(keys, shapes, dtypes)]
  return draw(nested(leaves))


@st.composite
def batch_trees(draw, size: int):
  """A batch of ``size`` examples: 1..4 float leaves [size, *features] in a drawn tree (or a bare array)."""
  n = draw(st.integers(1, 4))
  keys = jax.random.split(jax.random.key(draw(st.integers(0, 2**16))), n)
  leaves = [jax.random.normal(k, (size, *draw(st.sampled_from(FEATURE_SHAPES)))) for k in keys]
  return draw(nested(leaves))


def example_feature(batch):
  """One number per example from every batch leaf (a weighted mean, so it stays of order one): [b]."""
  xs = jax.tree.leaves(batch)
  weights = [(j + 1) / (len(xs) * (len(xs) + 1) / 2) for j in range(len(xs))]
  return sum(w * jnp.mean(x.reshape(x.shape[0], -1), axis=1) for w, x in zip(weights, xs))


def loss_fn(params, batch):
  """A mean over examples that reads every batch leaf and every parameter leaf per example.

  Kept well conditioned on purpose: no tanh saturates (a gradient that underflows to exactly zero on one side
  and is 1e-8 on the other sends Adam, whose step is about lr times the gradient's sign, a whole step apart)
  and lr times the curvature stays below one (rounding is not amplified from step to step)."""
  z = example_feature(batch)
  total = 0.0
  for j, p in enumerate(jax.tree.leaves(params)):
    p = p.astype(jnp.float32)
    t = jnp.tanh(0.5 * p[None] * z.reshape(-1, *(1,) * p.ndim) + 0.1 * (j + 1))  # [b, *p.shape]
    total = total + jnp.mean(t * t + 0.1 * t, axis=tuple(range(1, t.ndim)))
  return jnp.mean(total)


def optimizers():
  return st.sampled_from([("sgd", lambda: optax.sgd(0.3)), ("adam", lambda: optax.adam(0.05))])


def devices(n: int):
  return jax.devices()[:n]


def stacked_batches(draw, size: int):
  """``STEPS`` batches of one drawn structure (different values each step)."""
  first = draw(batch_trees(size))
  keys = jax.random.split(jax.random.key(draw(st.integers(0, 2**16))), STEPS)
  return [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), first) for k in keys]


def tolerance(tree, optimizer):
  """1e-5 in fp32. A bfloat16 parameter is rounded to 8 bits after every update, and a gradient averaged over
  devices is rounded differently from one computed whole: SGD's leaves may end an ulp or two apart, and Adam,
  whose step is about lr times the gradient's sign, may step the other way where a gradient is near zero."""
  adam = optimizer[0] == "adam"
  bf16 = dict(rtol=3e-2, atol=3e-2 + (0.05 * STEPS if adam else 0.0))
  return [bf16 if x.dtype == jnp.bfloat16 else dict(rtol=2e-5, atol=2e-6) for x in jax.tree.leaves(tree)]


def assert_equal_to_reference(strategy, params, batches, optimizer):
  """``STEPS`` steps of ``strategy`` equal ``STEPS`` steps of plain optax on one device: losses and params.

  ``optimizer``: a (name, factory) pair from ``optimizers()``. The first step's loss is compared to 1e-5 even
  for bfloat16 trees (the parameters are still equal then); later ones within bfloat16's rounding."""
  ref_params, _, ref_losses = single_device_reference(loss_fn, optimizer[1](), params, batches)
  state = strategy.init(params)
  losses = []
  for batch in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  got = state.params
  assert jax.tree.structure(got) == jax.tree.structure(params)
  np.testing.assert_allclose(losses[0], ref_losses[0], rtol=2e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=5e-2 if _has_bf16(params) else 2e-5)
  for i, (a, e, tol) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref_params),
                                      tolerance(params, optimizer))):
    assert a.dtype == e.dtype and a.shape == e.shape, f"leaf {i}: {a.dtype}{a.shape} vs {e.dtype}{e.shape}"
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), err_msg=f"leaf {i}", **tol)


def _has_bf16(tree):
  return any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(tree))


# ---- data parallelism --------------------------------------------------------------------------------------


def mean_reducers():
  """The exact reducers: every all-reduce algorithm, with XLA's buckets or small ones that split the leaves."""
  ppermute = st.sampled_from(["ring", "halving_doubling", "tree"])
  return st.one_of(st.just(jdist.reducers.mean()),
                   st.builds(jdist.reducers.mean, ppermute),
                   st.builds(lambda a, b: jdist.reducers.mean(a, bucket_bytes=b), ppermute, st.sampled_from([16, 64])))


@given(data=st.data(), n=st.sampled_from([1, 2, 3, 4, 8]), reducer=mean_reducers(),
       accumulate=st.sampled_from([1, 2]), opt=optimizers())
def test_data_parallel_equals_one_device(data, n, reducer, accumulate, opt):
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, n * accumulate * data.draw(st.sampled_from([1, 2])))
  mesh = jdist.make_mesh(data=n, devices=devices(n))
  strategy = jdist.data_parallel(loss_fn, opt[1](), mesh, reducer=reducer, accumulate_steps=accumulate)
  assert_equal_to_reference(strategy, params, batches, opt)


@given(data=st.data(), n=st.sampled_from([1, 2, 4, 8]), opt=optimizers())
def test_pmap_equals_one_device(data, n, opt):
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, n * data.draw(st.sampled_from([1, 2])))
  strategy = jdist.data_parallel(loss_fn, opt[1](), jdist.make_mesh(data=n, devices=devices(n)), backend="pmap")
  assert_equal_to_reference(strategy, params, batches, opt)


@given(data=st.data(), outer=st.sampled_from([2]), inner=st.sampled_from([2, 4]), opt=optimizers())
def test_hierarchical_allreduce_equals_one_device(data, outer, inner, opt):
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, outer * inner)
  mesh = jdist.make_mesh(node=outer, device=inner, devices=devices(outer * inner))
  strategy = jdist.data_parallel(loss_fn, opt[1](), mesh, axis=("node", "device"),
                                 reducer=jdist.reducers.mean("hierarchical"))
  assert_equal_to_reference(strategy, params, batches, opt)


@given(data=st.data(), n=st.sampled_from([1, 2, 3, 4, 8]), reducer=mean_reducers())
def test_local_sgd_sync_every_step_equals_one_device(data, n, reducer):
  # H = 1 with plain SGD: averaging the replicas after each step is averaging their gradients
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, n * data.draw(st.sampled_from([1, 2])))
  mesh = jdist.make_mesh(data=n, devices=devices(n))
  strategy = jdist.local_sgd(loss_fn, optax.sgd(0.3), mesh, sync_every=1, reducer=reducer)
  assert_equal_to_reference(strategy, params, batches, ("sgd", lambda: optax.sgd(0.3)))


@given(data=st.data(), workers=st.sampled_from([1, 2, 3, 4, 8]), on_mesh=st.booleans(), opt=optimizers())
def test_async_sgd_without_pauses_equals_one_device(data, workers, on_mesh, opt):
  # no pauses, apply="mean": every tick averages one gradient per worker, a synchronous step on their union
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, workers * data.draw(st.sampled_from([1, 2])))
  mesh = jdist.make_mesh(workers=workers, devices=devices(workers)) if on_mesh else None
  strategy = jdist.async_sgd(loss_fn, opt[1](), mesh, num_workers=workers, max_staleness=0)
  shard_batch = strategy.shard_batch
  strategy = strategy._replace(shard_batch=lambda batch: shard_batch(jdist.split_workers(batch, workers)))
  assert_equal_to_reference(strategy, params, batches, opt)


# ---- model parallelism -------------------------------------------------------------------------------------


def fitting_rules(params, axis: str, size: int):
  """One rule per leaf with a dimension divisible by ``size``: that dimension split over ``axis``."""
  rules = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dims = [d for d, s in enumerate(leaf.shape) if s % size == 0]
    if dims:
      spec = [None] * leaf.ndim
      spec[dims[-1]] = axis
      rules.append((f"^{path_str(path)}$", tuple(spec)))
  return rules


@given(data=st.data(), layout=st.sampled_from([(1, 2), (2, 2), (1, 4), (2, 4), (4, 2), (8, 1)]), opt=optimizers())
def test_sharded_with_fitting_rules_equals_one_device(data, layout, opt):
  n_data, n_model = layout
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, n_data * data.draw(st.sampled_from([1, 2])))
  mesh = jdist.make_mesh(data=n_data, model=n_model, devices=devices(n_data * n_model))
  rules = fitting_rules(params, "model", n_model) if n_model > 1 else ()
  if n_model > 1 and not rules:  # no parameter splits over "model": its devices would repeat the work
    with pytest.raises(jdist.errors.IdleAxesError):
      jdist.sharded(loss_fn, opt[1](), mesh, rules=rules)
    return
  assert_equal_to_reference(jdist.sharded(loss_fn, opt[1](), mesh, rules=rules), params, batches, opt)


@given(data=st.data(), n=st.sampled_from([2, 4, 8]), opt=optimizers(), gspmd=st.booleans())
def test_fsdp_equals_one_device(data, n, opt, gspmd):
  params = data.draw(param_trees())
  batches = stacked_batches(data.draw, n * data.draw(st.sampled_from([1, 2])))
  mesh = jdist.make_mesh(fsdp=n, devices=devices(n))
  if gspmd:
    strategy = jdist.sharded(loss_fn, opt[1](), mesh, data_axis=None, fsdp_axis="fsdp", fsdp_min_size=1)
  else:
    strategy = jdist.model_parallel.fsdp(loss_fn, opt[1](), mesh, min_size=1)
  assert_equal_to_reference(strategy, params, batches, opt)


# ---- pipeline ----------------------------------------------------------------------------------------------

WIDTH = 4  # the activations passed from stage to stage: [micro-batch, WIDTH]


@st.composite
def pipeline_params(draw, layers: int):
  """{"stages": a drawn tree of [layers, *shape] leaves, "embed": [features, WIDTH], "head": a drawn tree}."""
  stage_leaves = draw(st.integers(1, 4))
  keys = iter(jax.random.split(jax.random.key(draw(st.integers(0, 2**16))), 16))
  stages = [0.5 * jax.random.normal(next(keys), (layers, *draw(st.sampled_from(LEAF_SHAPES))))
            for _ in range(stage_leaves)]
  heads = [0.5 * jax.random.normal(next(keys), draw(st.sampled_from(LEAF_SHAPES)))
           for _ in range(draw(st.integers(1, 2)))]
  return {"stages": draw(nested(stages)), "head": draw(nested(heads)),
          "embed": jax.random.normal(next(keys), (5, WIDTH))}


def features(batch):
  """Every batch leaf, per example, as one [b, 5] input."""
  z = example_feature(batch)
  return jnp.stack([jnp.tanh(z), jnp.tanh(z * z), jnp.sin(z), jnp.cos(z), jnp.ones_like(z)], axis=1)


def input_fn(params, batch):
  return 0.3 * features(batch) @ params["embed"]  # [b, WIDTH], of order one


def stage_fn(layer, x):
  """One layer: every leaf of its parameters moves the activations (a little: 16 layers stay unsaturated)."""
  s = 0.1 * sum(jnp.mean(jnp.tanh(leaf)) * (j + 1) for j, leaf in enumerate(jax.tree.leaves(layer)))
  return x + 0.1 * jnp.tanh(x * (1 + s) + s)


def head_loss(params, y, batch):
  h = 0.1 * sum(jnp.mean(jnp.tanh(leaf)) for leaf in jax.tree.leaves(params["head"]))
  target = 0.3 * features(batch)[:, :WIDTH - 1].sum(axis=1, keepdims=True)
  return jnp.mean((y * (1 + h) - target) ** 2)


def sequential_loss(params, batch):
  """The same layers run in sequence on one device: the pipeline's reference."""
  y = jax.lax.scan(lambda x, layer: (stage_fn(layer, x), None), input_fn(params, batch), params["stages"])[0]
  return head_loss(params, y, batch)


SCHEDULES = ["gpipe", "circular", "1f1b", "interleaved_1f1b", "zb_h1", "zbv"]


# every schedule in every run: a sixth of the profile's examples each, at least 3 (the "ci" profile draws 8)
@pytest.mark.parametrize("schedule", SCHEDULES)
@settings(max_examples=max(3, settings.default.max_examples // len(SCHEDULES)))
@given(data=st.data(), layout=st.sampled_from([(1, 2), (1, 4), (1, 8), (2, 2), (2, 4)]),
       m_per_stage=st.sampled_from([1, 2]),
       opt=st.sampled_from([("sgd", lambda: optax.sgd(0.05)), ("adam", lambda: optax.adam(0.01))]))
def test_pipeline_equals_layers_in_sequence(data, layout, schedule, m_per_stage, opt):
  n_data, p = layout
  v = 2 if schedule in ("circular", "interleaved_1f1b", "zbv") else 1
  m = p * m_per_stage
  params = data.draw(pipeline_params(p * v * data.draw(st.sampled_from([1, 2]))))
  batches = stacked_batches(data.draw, n_data * m)
  mesh = (jdist.make_mesh(pipe=p, devices=devices(p)) if n_data == 1 else
          jdist.make_mesh(data=n_data, pipe=p, devices=devices(n_data * p)))
  strategy = jdist.pipeline(stage_fn, head_loss, opt[1](), mesh, microbatches=m, schedule=schedule,
                            repeats=v if schedule in ("circular", "interleaved_1f1b") else None, input_fn=input_fn,
                            data_axis="data" if n_data > 1 else None)
  ref_params, _, ref_losses = single_device_reference(sequential_loss, opt[1](), params, batches)
  state = strategy.init(params)
  losses = []
  for batch in batches:
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  got = unstack_params(state.params, strategy.info["schedule"])
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for i, (a, e) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(ref_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=2e-6, err_msg=f"leaf {i}")
