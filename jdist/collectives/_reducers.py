"""Reducers: how a strategy's per-device gradients become their mean, as a value (like a DDP communication hook).

A strategy decides *what* is averaged and over which mesh axis; a ``Reducer`` decides *how*. It is a
``NamedTuple`` of pure functions, like an optax ``GradientTransformation``:

- ``init(params, key) -> ReducerState``: the state of one device (zeros for an error-feedback residual, a
  random Q for PowerSGD), from a key the strategy splits off its own;
- ``reduce(grads, state, axis) -> (mean_grads, state)``: called inside ``jax.shard_map`` (or ``jax.pmap``) on
  this device's gradients; returns their mean over ``axis``, the same on every device.

``ReducerState(per_device, shared)`` says where each part of the state lives: ``per_device`` (a residual)
is kept once per device of the axis (stored with a leading axis of N, split over the mesh axis; ``reduce``
sees this device's part without it), ``shared`` (PowerSGD's Q) is replicated and must be updated
identically on every device. Reducers compose: ``bf16(inner=mean("ring"))`` sends bf16 through a ring,
``powersgd(4, inner=mean("ring"))`` sends its factors through one, so a combination that cannot run (int8
through a ring, a PowerSGD rank without PowerSGD) cannot be written.

Example (a user-written reducer: signSGD with majority vote)::

    def sign_mean():
      def reduce(grads, state, axis):
        return jax.tree.map(lambda g: jnp.sign(jax.lax.psum(jnp.sign(g), axis)), grads), state
      return Reducer(init=lambda params, key: ReducerState(), reduce=reduce, name="sign")

    jdist.data_parallel(loss_fn, optax.sgd(1e-3), mesh, reducer=sign_mean())
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jdist._checks import check_positive_int
from jdist._types import Params, PRNGKey, PyTree
from jdist.collectives._algorithms import Axis
from jdist.collectives._allreduce import DEFAULT_BUCKET_BYTES, allreduce, check_algorithm
from jdist.collectives._compression import (
  bf16_cast,
  int8_allreduce,
  powersgd_init,
  powersgd_reduce,
)
from jdist.errors import OptionError, OptionTypeError


class ReducerState(NamedTuple):
  """A reducer's state, split by where it lives.

  Attributes:
    per_device: one value per device of the axis (an error-feedback residual); ``init`` returns one device's
      (every device starts from it), the strategy stores them with a leading axis of N split over the mesh
      axis, and ``reduce`` sees and returns this device's.
    shared: the same on every device (PowerSGD's warm-start Q), replicated; ``reduce`` must return the same
      value on every device.
  """

  per_device: PyTree = ()
  shared: PyTree = ()


def _any_axis(axis: Axis) -> None:
  del axis


class Reducer(NamedTuple):
  """How gradients are averaged over a mesh axis: a pair of pure functions and a few facts about them.

  Attributes:
    init: ``init(params, key) -> ReducerState`` (``params`` may be arrays or tracers; only shapes and dtypes
      should matter).
    reduce: ``reduce(grads, state, axis) -> (mean_grads, state)``, inside ``shard_map``: ``grads`` this
      device's, ``mean_grads`` their mean over ``axis`` (a name or a tuple of names) with ``grads``'
      structure and dtypes, identical on every device.
    name: a short name for logs and strategy names (``"ring"``, ``"int8"``, ``"powersgd-r4"``).
    exact: True if ``reduce`` returns the exact mean (up to float rounding): on an axis of one device it is
      the identity, and strategies skip it (and the ``shard_map`` boundary) there.
    check: ``check(axis)`` raises for a mesh axis the reducer cannot reduce over (hierarchical needs two);
      strategies call it when they are built, before anything compiles.
  """

  init: Callable[[Params, PRNGKey], ReducerState]
  reduce: Callable[[Params, ReducerState, Axis], tuple[Params, ReducerState]]
  name: str = "custom"
  exact: bool = False
  check: Callable[[Axis], None] = _any_axis


def check_reducer(reducer: Any, what: str = "reducer") -> Reducer:
  """``reducer`` if it is a ``Reducer``, else an ``OptionTypeError`` naming the constructors."""
  if not isinstance(reducer, Reducer):
    raise OptionTypeError(what, reducer, "a jdist.reducers.Reducer", "Build one with jdist.reducers.mean(), "
                          "bf16(), int8() or powersgd(rank), or write your own Reducer(init, reduce).")
  return reducer


def _no_state(params: Params, key: PRNGKey) -> ReducerState:
  del params, key
  return ReducerState()


def mean(algorithm: str = "psum", *, bucket_bytes: int | None = None) -> Reducer:
  """The exact mean, through ``algorithm`` (``jdist.collectives.allreduce``).

  Args:
    algorithm: a key of ``jdist.collectives.ALGORITHMS``: ``psum`` (XLA's all-reduce), ``ring``,
      ``halving_doubling``, ``tree`` or ``hierarchical`` (over two mesh axes, ``axis=(outer, inner)``).
    bucket_bytes: for the algorithms written from ppermute, the largest flat bucket of gradients per collective
      (default 25 MiB, PyTorch DDP's); ``psum`` takes none (XLA combines its all-reduces itself).

  Raises:
    OptionError: an unknown algorithm, a ``bucket_bytes`` that is not a positive int, or one given to ``psum``.
  """
  check_algorithm(algorithm)
  if bucket_bytes is not None:
    if algorithm == "psum":
      raise OptionError("bucket_bytes", bucket_bytes, "None with algorithm='psum'",
                        "psum hands every gradient to XLA, which sizes its own buckets; drop bucket_bytes or pick "
                        "a ppermute algorithm, e.g. mean('ring', bucket_bytes=...).")
    check_positive_int(bucket_bytes, "bucket_bytes")
  size = DEFAULT_BUCKET_BYTES if bucket_bytes is None else int(bucket_bytes)

  def reduce(grads, state, axis):
    return allreduce(grads, axis, algorithm=algorithm, op="mean", bucket_bytes=size), state

  return Reducer(init=_no_state, reduce=reduce, name=algorithm, exact=True,
                 check=lambda axis: check_algorithm(algorithm, axis))


def _with_inner(own: str, inner: Reducer) -> str:
  return own if inner.name == "psum" else f"{own}+{inner.name}"


def bf16(inner: Reducer | None = None) -> Reducer:
  """Floating gradients sent (and summed) in bfloat16 through ``inner`` (default ``mean()``), returned in their
  own dtypes: half the bytes of fp32, rounded to bf16's 8 bits of mantissa."""
  inner = mean() if inner is None else check_reducer(inner, "inner")

  def reduce(grads, state, axis):
    out, state = inner.reduce(bf16_cast(grads), state, axis)
    return jax.tree.map(lambda x, g: x.astype(g.dtype), out, grads), state

  return Reducer(init=inner.init, reduce=reduce, name=_with_inner("bf16", inner), check=inner.check)


def residual_zeros(params: Params) -> Params:
  """An error-feedback residual for ``params``: zeros of their shapes in float32 or wider, whatever their dtype
  (a bf16 residual would round away the small values it exists to keep)."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)


def int8() -> Reducer:
  """Gradients quantised to int8 with one shared scale and error feedback (``jdist.collectives.int8_allreduce``).

  The per-device residual (what quantisation lost, sent at later steps) is the state's ``per_device`` part.
  The int8 sum runs through its own all-to-all and all-gather, so it takes no algorithm or bucket size.
  """
  def init(params, key):
    del key
    return ReducerState(per_device=residual_zeros(params))

  def reduce(grads, state, axis):
    out, residual = int8_allreduce(grads, state.per_device, axis)
    return out, state._replace(per_device=residual)

  return Reducer(init=init, reduce=reduce, name="int8")


def powersgd(rank: int = 1, *, stacked: Sequence[str] = (), inner: Reducer | None = None) -> Reducer:
  """PowerSGD (Vogels et al. 2019): each gradient matrix sent as rank-``rank`` factors, with error feedback.

  A leaf seen as [shape[0], prod(rest)] = [m, n] is replaced by P Q^T: one device sends r(m + n) floats in two
  all-reduces through ``inner`` instead of mn. Vectors and matrices with r(m + n) >= mn are all-reduced exactly.
  The state holds the per-device residual (``per_device["residual"]``) and Q, replicated
  (``shared["q"]``: the next step's warm start, drawn from the key at ``init``).

  Args:
    rank: r, a positive int.
    stacked: regular expressions over parameter paths (``"blocks/qkv"``) of leaves whose leading axis stacks
      layers (``jdist.models.gpt.STACKED``): each layer's matrix is approximated on its own, stacked vectors
      sent exactly. Every expression must match a parameter (checked at ``init``).
    inner: the exact mean the factors travel through (default ``mean()``; e.g. ``mean("ring")``).

  Raises:
    OptionError: a bad rank, a pattern that is not a regular expression, an ``inner`` that is not an exact
      mean.
    OptionTypeError: ``stacked`` given as a bare string.
  """
  rank = check_positive_int(rank, "rank")
  patterns = _compile_patterns(stacked, "stacked")
  inner = mean() if inner is None else check_reducer(inner, "inner")
  if not inner.exact:
    raise OptionError("inner", inner.name, "an exact mean reducer such as mean('ring')",
                      "PowerSGD's factors must be averaged exactly; compress with powersgd or the inner, not both.")

  def init(params, key):
    q = powersgd_init(params, rank, key=key, stacked=_stacked_leaves(params, patterns))
    return ReducerState(per_device={"residual": residual_zeros(params)}, shared={"q": q})

  def reduce(grads, state, axis):
    mean_fn = lambda tree: inner.reduce(tree, ReducerState(), axis)[0]
    out, residual, q = powersgd_reduce(grads, state.per_device["residual"], state.shared["q"], mean_fn)
    return out, ReducerState(per_device={"residual": residual}, shared={"q": q})

  return Reducer(init=init, reduce=reduce, name=_with_inner(f"powersgd-r{rank}", inner), check=inner.check)


def _compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    raise OptionTypeError(what, patterns, "a sequence of regular expressions", f"Wrap it in a list: [{patterns!r}].")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except (re.error, TypeError) as e:
      raise OptionError(what, pattern, "a regular expression", f"It does not compile ({e}).") from None
  return compiled


def _stacked_leaves(params: Params, patterns: list[re.Pattern]) -> Params:
  """A tree of bools like ``params``: True where a pattern matches the leaf's path ("blocks/qkv")."""
  from jdist.strategies.model_parallel import path_str

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(path) for path, _ in flat]
  for pattern in patterns:
    if not any(pattern.search(p) for p in paths):
      raise OptionError("stacked", pattern.pattern, "a pattern that matches a parameter path",
                        f"The parameter paths are: {', '.join(paths)}.")
  return jax.tree.unflatten(treedef, [any(pt.search(p) for pt in patterns) for p in paths])



# ---- for strategies: where a reducer's state lives ------------------------------------------------------------


def state_shardings(mesh: jax.sharding.Mesh, axes: Sequence[str]) -> ReducerState:
  """The shardings of a reducer state stored by a strategy: ``per_device`` leaves [N, ...] split over ``axes``
  (one row per device), ``shared`` leaves replicated (a prefix of any state)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  return ReducerState(per_device=NamedSharding(mesh, P(tuple(axes))), shared=NamedSharding(mesh, P()))


def init_state(reducer: Reducer, params: Params, key: jax.Array, mesh: jax.sharding.Mesh,
               axes: Sequence[str]) -> ReducerState:
  """``reducer.init(params, key)`` placed on ``mesh``: every device's ``per_device`` part starts as the one
  ``init`` returns (stacked on a leading axis of N, split over ``axes``), ``shared`` replicated.

  Args:
    key: raw key data (a strategy's ``state.key``, split); ``init`` gets it as a typed key.
  """
  import math

  n = math.prod(mesh.shape[a] for a in axes)

  def build(params, key):
    state = reducer.init(params, jax.random.wrap_key_data(key))
    if not isinstance(state, ReducerState):
      raise OptionTypeError("reducer.init(params, key)", state, "a ReducerState(per_device=..., shared=...)")
    return state._replace(per_device=jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state.per_device))

  return jax.jit(build, out_shardings=state_shardings(mesh, axes))(params, key)


def local_view(state: ReducerState) -> ReducerState:
  """Inside ``shard_map``: the stored state (``per_device`` leaves [1, ...] on this device) as ``reduce`` sees it."""
  return state._replace(per_device=jax.tree.map(lambda x: x[0], state.per_device))


def stored_view(state: ReducerState) -> ReducerState:
  """The inverse of ``local_view``: this device's ``per_device`` leaves given back their leading axis of 1."""
  return state._replace(per_device=jax.tree.map(lambda x: x[None], state.per_device))


__all__ = ["Reducer", "ReducerState", "bf16", "check_reducer", "init_state", "int8", "local_view", "mean", "powersgd",
           "residual_zeros", "state_shardings", "stored_view"]
