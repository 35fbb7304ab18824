"""Every AllReduce algorithm equals psum (and its numpy reference), on awkward pytrees and meshes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jdist
from jdist.analysis import theory
from jdist.errors import OptionError
from jdist.collectives import (
  REFERENCES,
  allreduce,
  bf16_allreduce,
  hierarchical_reference,
  int8_allreduce,
  ring_reference,
)

SIZES = [(1,), (7,), (13, 3), (2, 5, 11), (64,)]  # 1 element, primes, not divisible by N


def _per_device_tree(n, dtype, seed):
  rng = np.random.default_rng(seed)
  if np.issubdtype(dtype, np.integer):
    return {f"leaf{i}": rng.integers(-1000, 1000, size=(n,) + s).astype(dtype) for i, s in enumerate(SIZES)}
  return {f"leaf{i}": rng.normal(size=(n,) + s).astype(dtype) for i, s in enumerate(SIZES)}


def _run(tree, mesh, axis, **kwargs):
  """Runs allreduce on stacked per-device values [N, ...]; returns every device's result, stacked."""
  spec = P(axis)

  def body(t):
    t = jax.tree.map(lambda x: x[0], t)  # this device's values
    return jax.tree.map(lambda x: x[None], allreduce(t, axis, **kwargs))

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
  return jax.device_get(f(tree))


def _mesh(n):
  return jdist.make_mesh(data=n, devices=jax.devices()[:n])


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_float_pytrees_equal_psum(algorithm, n):
  tree = _per_device_tree(n, np.float32, seed=n)
  mesh = _mesh(n)
  ours = _run(tree, mesh, "data", algorithm=algorithm)
  ref = _run(tree, mesh, "data", algorithm="psum")
  for k in tree:
    expected = np.sum(tree[k], axis=0)
    for d in range(n):
      np.testing.assert_allclose(ours[k][d], ref[k][d], rtol=1e-6, atol=1e-5)
      np.testing.assert_allclose(ours[k][d], expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree"])
@pytest.mark.parametrize("n", [2, 3, 8])
def test_integer_payloads_bit_for_bit(algorithm, n):
  tree = _per_device_tree(n, np.int32, seed=10 + n)
  mesh = _mesh(n)
  ours = _run(tree, mesh, "data", algorithm=algorithm, bucket_bytes=64)  # many small buckets too
  ref = _run(tree, mesh, "data", algorithm="psum")
  for k in tree:
    np.testing.assert_array_equal(ours[k], ref[k])


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree"])
@pytest.mark.parametrize("n", [2, 3, 5, 6, 8])
def test_numpy_references_match_the_sum(algorithm, n):
  rng = np.random.default_rng(n)
  p = 1 << (n.bit_length() - 1)
  for size in (np.lcm(n, p) * 3, 7):  # 7: not a multiple of N or p, padded as the JAX versions pad
    xs = [rng.integers(-50, 50, size=size).astype(np.int64) for _ in range(n)]
    for got in REFERENCES[algorithm](xs):
      np.testing.assert_array_equal(got, np.sum(xs, axis=0))


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree"])
def test_jax_equals_numpy_reference_bitwise(algorithm):
  n = 8
  rng = np.random.default_rng(1)
  xs = rng.integers(-10**6, 10**6, size=(n, 24)).astype(np.int32)
  ours = _run({"x": xs}, _mesh(n), "data", algorithm=algorithm)["x"]
  np.testing.assert_array_equal(ours, np.stack(REFERENCES[algorithm](list(xs))))


def test_hierarchical_on_2x4_mesh():
  mesh = jdist.make_mesh(node=2, device=4)
  tree = _per_device_tree(8, np.float32, seed=3)
  stacked = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), tree)

  def body(t):
    t = jax.tree.map(lambda x: x[0, 0], t)
    return jax.tree.map(lambda x: x[None, None], allreduce(t, ("node", "device"), algorithm="hierarchical"))

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("node", "device"), out_specs=P("node", "device"),
                            check_vma=False))
  out = jax.device_get(f(stacked))
  for k in tree:
    expected = np.sum(tree[k], axis=0)
    for o in range(2):
      for i in range(4):
        np.testing.assert_allclose(out[k][o, i], expected, rtol=1e-6, atol=1e-5)
  ints = np.random.default_rng(0).integers(-99, 99, size=(8, 16)).astype(np.int32)
  got = jax.device_get(f({"x": ints.reshape(2, 4, 16)}))["x"].reshape(8, 16)
  np.testing.assert_array_equal(got, np.stack(hierarchical_reference(list(ints), 2, 4)))


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree", "hierarchical"])
def test_tuple_axis_in_another_order_than_the_mesh_equals_psum(algorithm):
  # axis_index numbers devices in the tuple's order, ppermute in the mesh's: the algorithms must not mix them
  mesh = jdist.make_mesh(node=2, device=3, devices=jax.devices()[:6])
  axis = ("device", "node")
  tree = _per_device_tree(6, np.float32, seed=4)
  ours = _run(tree, mesh, axis, algorithm=algorithm)
  ref = _run(tree, mesh, axis, algorithm="psum")
  for k in tree:
    for d in range(6):
      np.testing.assert_allclose(ours[k][d], ref[k][d], rtol=1e-6, atol=1e-5)
      np.testing.assert_allclose(ours[k][d], np.sum(tree[k], axis=0), rtol=1e-6, atol=1e-5)
  ints = {"x": np.random.default_rng(0).integers(-99, 99, size=(6, 10)).astype(np.int32)}
  np.testing.assert_array_equal(_run(ints, mesh, axis, algorithm=algorithm)["x"], np.tile(ints["x"].sum(0), (6, 1)))


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling", "tree", "hierarchical"])
def test_bool_leaves_are_counted_like_psum(algorithm):
  mesh = jdist.make_mesh(node=2, device=2, devices=jax.devices()[:4])
  axis = ("node", "device")
  tree = {"mask": np.array([[True, False], [True, False], [False, False], [True, True]]),
          "x": np.arange(4, dtype=np.int32)[:, None]}
  ours = _run(tree, mesh, axis, algorithm=algorithm, bucket_bytes=1)
  ref = _run(tree, mesh, axis, algorithm="psum")
  assert ours["mask"].dtype == ref["mask"].dtype == np.int32
  np.testing.assert_array_equal(ours["mask"], np.tile([3, 1], (4, 1)))
  np.testing.assert_array_equal(ours["mask"], ref["mask"])


def test_mean_op():
  tree = _per_device_tree(4, np.float32, seed=0)
  out = _run(tree, _mesh(4), "data", algorithm="ring", op="mean")
  for k in tree:
    np.testing.assert_allclose(out[k][0], np.mean(tree[k], axis=0), rtol=1e-6, atol=1e-6)


def test_ring_trace_shows_the_article_figure():
  xs = [np.full(4, float(d + 1)) for d in range(4)]
  results, steps = ring_reference(xs, trace=True)
  assert len(steps) == 6 and steps[0][0] == "reduce-scatter" and steps[-1][0] == "all-gather"
  phase, step, chunks = steps[2]  # after reduce-scatter: device i holds the full sum of chunk i
  for i in range(4):
    assert chunks[i][i][0] == 10.0
  for r in results:
    np.testing.assert_array_equal(r, np.full(4, 10.0))


def _run_fn(fn, trees, mesh, axis="data"):
  """Runs ``fn(*trees)`` inside shard_map on stacked per-device values [N, ...]; returns its outputs, stacked."""

  def body(*ts):
    out = fn(*jax.tree.map(lambda x: x[0], ts))
    return jax.tree.map(lambda x: x[None], out)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False))
  return jax.device_get(f(*trees))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_int8_a_non_finite_gradient_gives_nan_not_a_finite_sum(bad):
  # pmax may drop a NaN and NaN cast to int8 is 0: the sum must still come out non-finite, like psum's,
  # and no later step may come out finite with the bad device's coordinate silently lost
  n = 4
  g = np.ones((n, 6), np.float32)
  g[1, 2] = bad
  int8 = lambda t, r: int8_allreduce(t, r, "data", op="mean")
  out, res = _run_fn(int8, ({"g": g}, {"g": np.zeros_like(g)}), _mesh(n))
  assert not np.isfinite(_run({"g": g}, _mesh(n), "data", op="mean")["g"][:, 2]).any()  # psum's answer
  assert np.isnan(out["g"]).all() and np.isnan(res["g"]).all()
  out, res = _run_fn(int8, ({"g": np.ones_like(g)}, res), _mesh(n))  # clean gradients, the residual kept
  assert np.isnan(out["g"]).all()


def test_bf16_a_nan_gradient_gives_nan():
  n = 4
  g = np.ones((n, 6), np.float32)
  g[1, 2] = np.nan
  for algorithm in ["psum", "ring"]:
    out = _run_fn(lambda t, a=algorithm: bf16_allreduce(t, "data", algorithm=a), ({"g": g},), _mesh(n))["g"]
    assert np.isnan(out[:, 2]).all() and (out[:, [0, 1, 3, 4, 5]] == 1.0).all(), algorithm


def test_int8_reversed_tuple_axis_and_empty_trees():
  mesh = jdist.make_mesh(node=2, device=3, devices=jax.devices()[:6])
  g = np.random.default_rng(0).normal(size=(6, 11)).astype(np.float32)
  outs = []
  for axis in [("node", "device"), ("device", "node")]:
    int8 = lambda t, r, a=axis: int8_allreduce(t, r, a, op="sum")
    out, res = _run_fn(int8, ({"g": g}, {"g": np.zeros_like(g)}), mesh, axis)
    np.testing.assert_allclose(out["g"][0], g.sum(0), atol=6 * np.abs(g).max() / 127)
    outs.append(out["g"])
  np.testing.assert_array_equal(outs[0], outs[1])
  # a tree with no elements reduces to itself (there is no max to take a scale from)
  empty = {"e": np.zeros((2, 0, 3), np.float32)}
  out, res = _run_fn(lambda t, r: int8_allreduce(t, r, "data"), (empty, empty), _mesh(2))
  assert out["e"].shape == res["e"].shape == (2, 0, 3)
  mixed = (empty | {"g": g[:2]}, empty | {"g": 0 * g[:2]})
  out, res = _run_fn(lambda t, r: int8_allreduce(t, r, "data", op="sum"), mixed, _mesh(2))
  np.testing.assert_allclose(out["g"][1], g[:2].sum(0), atol=2 * np.abs(g[:2]).max() / 127)


# ---- bad input and theory -----------------------------------------------------------------------------


def test_unknown_algorithm_lists_valid_ones():
  with pytest.raises(OptionError) as err:
    _run({"x": np.ones((2, 3), np.float32)}, _mesh(2), "data", algorithm="rign")
  assert (err.value.name, err.value.got) == ("algorithm", "rign")
  assert err.value.expected == "one of ['halving_doubling', 'hierarchical', 'psum', 'ring', 'tree']"
  assert str(err.value).endswith("Did you mean 'ring'?")


def test_hierarchical_needs_two_axes():
  with pytest.raises(OptionError) as err:
    _run({"x": np.ones((2, 3), np.float32)}, _mesh(2), "data", algorithm="hierarchical")
  assert (err.value.name, err.value.got) == ("axis", "data")


def test_mean_of_integers_and_bad_bucket():
  with pytest.raises(TypeError, match="op='mean' needs floating-point"):
    _run({"x": np.ones((2, 3), np.int32)}, _mesh(2), "data", algorithm="ring", op="mean")
  with pytest.raises(OptionError) as err:
    _run({"x": np.ones((2, 3), np.float32)}, _mesh(2), "data", algorithm="ring", bucket_bytes=0)
  assert (err.value.name, err.value.got) == ("bucket_bytes", 0)


def test_int8_unknown_op():
  g = {"g": np.ones((2, 3), np.float32)}
  for op in ["max", "avg"]:
    with pytest.raises(OptionError) as err:
      _run_fn(lambda t, r, o=op: int8_allreduce(t, r, "data", op=o), (g, g), _mesh(2))
    assert (err.value.name, err.value.got, err.value.expected) == ("op", op, "one of ['sum', 'mean']")
  # a residual not shaped like the values: an error, not a broadcast or a truncated sum
  two = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}
  for residual, match in (({"a": two["a"]}, "residual must have the structure of the values"),
                          ({"a": two["a"], "b": np.ones((2, 1), np.float32)}, r"residual leaf 1 has shape \(1,\)")):
    with pytest.raises(ValueError, match=match):
      _run_fn(lambda t, r: int8_allreduce(t, r, "data"), (two, residual), _mesh(2))


def test_theory():
  assert theory.allreduce_bytes(800, 8, "ring") == 1400
  assert theory.allreduce_bytes(800, 8, "halving_doubling") == 1400
  assert theory.allreduce_bytes(800, 6, "halving_doubling") == 2 * 3 / 4 * 800 + 800
  assert theory.allreduce_bytes(800, 8, "tree") == 3 * 800  # the root, in the broadcast
  with pytest.raises(jdist.errors.OptionError) as e:
    theory.allreduce_bytes(800, 8, "hierarchical", inner=0)
  assert (e.value.name, e.value.got) == ("inner", 0)
  assert theory.allreduce_bytes(800, 8, "hierarchical", inner=4) == 2 * 3 / 4 * 800 + 2 * 1 / 8 * 800
  assert theory.allreduce_bytes(800, 1) == 0
  with pytest.raises(jdist.errors.OptionError) as e:
    theory.allreduce_bytes(1, 2, "magic")
  assert (e.value.name, e.value.got) == ("algorithm", "magic")


@pytest.mark.parametrize("algorithm", ["ring", "halving_doubling"])
def test_compiled_bytes_match_theory(algorithm):
  n, size = 8, 8 * 1024
  mesh = _mesh(n)

  def body(x):
    return allreduce(x[0], "data", algorithm=algorithm)[None]

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
  report = jdist.comm_report(f.lower(jnp.ones((n, size), jnp.float32)))
  assert set(report.stats) == {"collective-permute"}
  np.testing.assert_allclose(report.total_sent_bytes, theory.allreduce_bytes(size * 4, n, algorithm))
