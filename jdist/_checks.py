"""Argument checks shared by every strategy, and the typed errors they raise."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jdist._types import Params
from jdist.errors import AxisError, IdleAxesError, OptionError, OptionTypeError
from jdist.mesh import as_axes


def check_mesh(mesh: Any) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise OptionTypeError("mesh", mesh, "a jax.sharding.Mesh, e.g. jdist.make_mesh(data=-1)")
  return mesh


def check_no_idle_axes(mesh: Mesh, used: Sequence[str], *, who: str, fix: str) -> None:
  """Refuses a mesh with an axis of more than one device that ``who`` does not use: the devices along it
  would all hold the same data and compute the same step, a copy of the work that only costs time.

  Args:
    used: the axes ``who`` splits the batch, the parameters or the workers over.
    fix: how to use such an axis with ``who`` (its argument that names axes), said in the message.

  Raises:
    IdleAxesError: a ``ValueError`` that names the axes and the smaller mesh.
  """
  idle = {a: int(n) for a, n in mesh.shape.items() if a not in used and n > 1}
  if idle:
    # the smaller mesh: the axes used (or, if none is, one device on the first axis)
    kept = {a: int(mesh.shape[a]) for a in mesh.axis_names if a in used} or {mesh.axis_names[0]: 1}
    it = "it" if len(idle) == 1 else "them"
    problem = (f"{who} uses mesh axes {tuple(a for a in mesh.axis_names if a in used)}, but the mesh also has "
               f"{', '.join(f'{a!r} of size {n}' for a, n in idle.items())}: the devices along {it} would each "
               f"compute the same thing.")
    raise IdleAxesError(problem, f"{fix}, or build the mesh without {it}, e.g. jdist.make_mesh("
                        f"{', '.join(f'{a}={n}' for a, n in kept.items())}, devices=jax.devices()"
                        f"[:{math.prod(kept.values())}]).", idle, kept)


def check_axes(mesh: Mesh, axis: str | Sequence[str], *, what: str = "axis") -> tuple[str, ...]:
  """Returns ``axis`` as a tuple after checking ``mesh`` is a mesh and every name is one of its axes, once."""
  check_mesh(mesh)
  axes = as_axes(axis)
  if not axes or not all(isinstance(a, str) for a in axes):
    raise TypeError(f"{what} must be a mesh axis name or a tuple of names, got {axis!r}.")
  if len(set(axes)) != len(axes):
    raise AxisError(f"{what} {axis!r} names a mesh axis more than once; name each axis once.",
                    next(a for a in axes if axes.count(a) > 1), mesh.shape)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise AxisError(
        f"{what} {missing[0]!r} is not an axis of the mesh; the mesh has axes {tuple(mesh.axis_names)} "
        f"with sizes {dict(mesh.shape)}. Pass one of those names or build the mesh with "
        f"jdist.make_mesh({missing[0]}=...).", missing[0], mesh.shape)
  return axes


def one_axis(axis: Any, *, who: str, example: str = "data") -> str:
  """``axis`` as one mesh axis name (a str, or a tuple or list of one str), for ``who``, a strategy that
  runs over a single axis.

  Raises:
    ValueError: several (or no) names. TypeError: not a name.
  """
  if isinstance(axis, str):
    return axis
  if isinstance(axis, (tuple, list)) and all(isinstance(a, str) for a in axis):
    if len(axis) == 1:
      return axis[0]
    raise ValueError(
        f"{who} runs over one mesh axis, got axis={axis!r} ({len(axis)} names). Pass one name, e.g. "
        f"axis={axis[0] if axis else example!r}; to use the devices of several axes, build a mesh with one axis "
        f"over them, e.g. jdist.make_mesh({example}=-1, devices=mesh.devices.ravel()).")
  raise TypeError(f"axis must be a mesh axis name (a str), got {axis!r} ({type(axis).__name__}).")


def check_axis(mesh: Mesh, axis: Any, *, who: str, what: str = "axis", example: str = "data") -> str:
  """``one_axis``, then checks the name is an axis of ``mesh``."""
  return check_axes(mesh, one_axis(axis, who=who, example=example), what=what)[0]


def check_callable(fn: Any, what: str) -> None:
  if not callable(fn):
    raise OptionTypeError(what, fn, "callable")


def check_optimizer(optimizer: Any) -> None:
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise OptionTypeError("optimizer", optimizer, "an optax.GradientTransformation (with init and update)",
                          "Build one with e.g. optax.sgd(0.1) or optax.adam(1e-3).")


def check_positive_int(value: Any, what: str) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise OptionError(what, value, "a positive int")
  return int(value)


def check_choice(value: Any, what: str, choices: Sequence[Any]) -> Any:
  """``value`` if it is one of ``choices``, else an ``OptionError`` that lists them."""
  if value not in choices:
    raise OptionError(what, value, f"one of {list(choices)}")
  return value


def check_params(params: Params) -> Params:
  """Converts leaves to arrays and rejects empty parameter trees and leaves that cannot be differentiated
  (not arrays; integer, bool or PRNG-key arrays)."""
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("params is an empty pytree; expected a pytree of arrays (a dict, nnx.State, ...).")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    where = f"params leaf {jax.tree_util.keystr(path)}"
    if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int))):
      raise TypeError(f"{where} is a {type(leaf).__name__}; expected an array. For a flax NNX model pass the "
                      f"state from nnx.split(model).")
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)  # a key array's dtype is key<...>
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(f"{where} has dtype {dtype}; every parameter is differentiated, so it must be a float "
                      f"array. Keep counters and random keys out of params (close over them, or pass them in "
                      f"the batch); for a flax NNX model split off the parameters: "
                      f"graphdef, params, rest = nnx.split(model, nnx.Param, ...).")
  return jax.tree.map(jnp.asarray, params)

