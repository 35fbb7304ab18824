"""A layer's VJP taken apart: what its forward keeps for the backward, and the backward split in two.

``jax.vjp(layer_fn, w, x)`` returns a pullback whose leaves are the residuals: values of the forward that
the backward reads. Stashed as they are, once per micro-batch, they would include the weights themselves
(``x @ w`` keeps ``w`` to compute ``g @ w.T``) and anything computed from the weights alone (a cast to
bf16, a transpose): a copy of the stage's weights per micro-batch in flight. So the VJP is traced once
to two jaxprs, calls inlined (``flat_jaxpr``): the forward ``(w, aux, x) -> (y, residuals)`` and the
backward ``(residuals, g) -> (g_w, g_x)``; ``aux`` holds what is neither weight nor activation (the
layer's PRNG key). A residual that depends on the activation ``x`` is stashed; every other one is
recomputed in the backward from ``w`` and ``aux`` (the weights are loop constants there too).

``policy`` (a ``jax.checkpoint`` policy, e.g. ``jax.checkpoint_policies.dots_saveable``) chooses which
activation-dependent residuals are stashed, by the primitive that computes each, as ``jax.checkpoint``
chooses what to save; the rest are recomputed from the stashed ones and ``x``. ``None`` stashes them all
(no forward recomputation); ``nothing_saveable`` stashes ``x`` alone (the backward reruns the forward).

For zero-bubble schedules the backward splits at the level of its equations (Qi et al., "Zero Bubble
Pipeline Parallelism", ICLR 2024: "B" computes the gradient of the input, "W" that of the weights): the
input gradient's part runs in B; the rest runs in W from the stash and the values B hands over (``carry``:
each layer's pre-activation cotangents, residuals B recomputed). A loop inside the layer (a ``lax.scan``)
stays one equation: whatever both parts need from it runs in B.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.extend as jex

# higher-order primitives whose body is evaluated in place (the same values, one flat list of equations)
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr"}


def _body(eqn) -> tuple[Any, list] | None:
  """(jaxpr, consts) of a call-like equation whose inputs are its body's inputs; None otherwise."""
  inner = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
  if isinstance(inner, jex.core.ClosedJaxpr):
    inner, consts = inner.jaxpr, inner.consts
  elif isinstance(inner, jex.core.Jaxpr):
    consts = []
  else:
    return None
  return (inner, consts) if len(inner.invars) == len(eqn.invars) else None


def _vars(atoms) -> list:
  return [v for v in atoms if isinstance(v, jex.core.Var)]


def _read(env: dict, v) -> Any:
  return v.val if isinstance(v, jex.core.Literal) else env[v]


def run_eqns(eqns, env: dict, inline: bool = False) -> dict:
  """Binds ``eqns`` in order on the values of ``env`` (var -> value), adding their outputs to it."""
  for eqn in eqns:
    ins = [_read(env, v) for v in eqn.invars]
    body = _body(eqn) if inline else None
    if body is not None:
      inner, consts = body
      outs = [_read(e, v) for e in [run_eqns(inner.eqns, {**dict(zip(inner.constvars, consts)),
                                                         **dict(zip(inner.invars, ins))}, inline)]
              for v in inner.outvars]
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jex.core.DropVar))
  return env


def flat_jaxpr(fun: Callable, *args) -> jex.core.ClosedJaxpr:
  """``jax.make_jaxpr(fun)(*args)`` with calls (jit, checkpoint, custom_jvp/vjp) inlined, loops kept."""
  closed = jax.make_jaxpr(fun)(*args)

  def flat(*flat_args):
    env = dict(zip(closed.jaxpr.constvars, closed.consts)) | dict(zip(closed.jaxpr.invars, flat_args))
    env = run_eqns(closed.jaxpr.eqns, env, inline=True)
    return [_read(env, v) for v in closed.jaxpr.outvars]

  return jax.make_jaxpr(flat)(*jax.tree.leaves(args))


def needed(eqns, targets, known) -> list:
  """The equations (in order) that compute ``targets`` from ``known`` vars (and literals)."""
  need = {v for v in targets if isinstance(v, jex.core.Var) and v not in known}
  kept = []
  for eqn in reversed(eqns):
    if any(v in need for v in eqn.outvars):
      kept.append(eqn)
      need.update(v for v in eqn.invars if isinstance(v, jex.core.Var) and v not in known)
  return kept[::-1]


def depends_on(jaxpr, sources) -> set:
  """The vars of ``jaxpr`` computed from ``sources`` (an equation's outputs depend on all its inputs)."""
  dep = set(sources)
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jex.core.Var) and v in dep for v in eqn.invars):
      dep.update(eqn.outvars)
  return dep


def saved(decision: Any) -> bool:
  """A ``jax.checkpoint`` policy's answer as a bool: True, ``Saveable`` or ``Offloadable`` save the value."""
  return decision is True or type(decision).__name__ in ("SaveableType", "Offloadable")


def saves(policy: Callable | None, eqn) -> bool:
  """Whether ``policy`` (None: every value) saves ``eqn``'s output."""
  return policy is None or saved(policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerVjp:
  """One layer's forward and backward as flat jaxprs, and which forward values are stashed.

  ``forward(w, aux, x) -> (y, stash)``; ``backward(w, aux, stash, g) -> (g_w, g_x)``; for split schedules
  ``input_grad(w, aux, stash, g) -> (g_x, carry)`` then ``weight_grad(w, aux, stash, carry) -> g_w``.
  ``stash`` and ``carry`` are lists of arrays (``stash_types``, ``carry_types``); ``w`` and ``g_w`` are
  pytrees like the layer's parameters.
  """

  fwd: Any  # ClosedJaxpr: (w leaves, aux leaves, x) -> (y, residuals...)
  bwd: Any  # ClosedJaxpr: (residuals..., g) -> (g_w leaves..., g_x)
  w_tree: Any  # treedef of the layer's parameters
  n_w: int  # leaves of w, then of aux, in fwd's inputs
  n_aux: int
  stash: tuple  # fwd vars stashed from F to the last backward op (x among them when needed)

  @property
  def stash_types(self) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.stash]

  @property
  def carry_types(self) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self._carry_vars]

  # ---- the pieces, as values ----------------------------------------------------------------------

  def _inputs(self, w: Any, aux: Any) -> dict:
    j = self.fwd.jaxpr
    env = dict(zip(j.constvars, self.fwd.consts))
    env.update(zip(j.invars[:self.n_w + self.n_aux], jax.tree.leaves(w) + jax.tree.leaves(aux)))
    return env

  def _residuals(self, w: Any, aux: Any, stash: list, wanted) -> list:
    """The forward's residuals at positions ``wanted``, recomputed from w, aux and the stash."""
    j = self.fwd.jaxpr
    env = self._inputs(w, aux) | dict(zip(self.stash, stash))
    res = [j.outvars[1 + k] for k in wanted]
    run_eqns(needed(j.eqns, res, env), env)
    return [_read(env, v) for v in res]

  def forward(self, w: Any, aux: Any, x: jax.Array) -> tuple[jax.Array, list]:
    j = self.fwd.jaxpr
    env = self._inputs(w, aux) | {j.invars[-1]: x}
    run_eqns(needed(j.eqns, [j.outvars[0], *self.stash], env), env)
    return _read(env, j.outvars[0]), [_read(env, v) for v in self.stash]

  def _bwd_env(self, w: Any, aux: Any, stash: list, g: jax.Array, eqns) -> dict:
    b = self.bwd.jaxpr
    used = set(_vars(v for e in eqns for v in e.invars)) | set(_vars(b.outvars))
    wanted = [k for k, v in enumerate(b.invars[:-1]) if v in used]
    env = dict(zip(b.constvars, self.bwd.consts)) | {b.invars[-1]: g}
    env.update(zip([b.invars[k] for k in wanted], self._residuals(w, aux, stash, wanted)))
    return env

  def backward(self, w: Any, aux: Any, stash: list, g: jax.Array) -> tuple[Any, jax.Array]:
    b = self.bwd.jaxpr
    env = self._bwd_env(w, aux, stash, g, b.eqns)
    run_eqns(b.eqns, env)
    outs = [_read(env, v) for v in b.outvars]
    return jax.tree.unflatten(self.w_tree, outs[:-1]), outs[-1]

  @functools.cached_property
  def _split(self) -> tuple[list, list]:
    b = self.bwd.jaxpr
    to_x = needed(b.eqns, b.outvars[-1:], set(b.invars) | set(b.constvars))
    rest = needed(b.eqns, b.outvars[:-1], set(b.invars) | set(b.constvars) | {v for e in to_x for v in e.outvars})
    return to_x, rest

  @functools.cached_property
  def _carry_vars(self) -> list:
    """What W reads that B computed (or received: g), in a fixed order; the residuals W recomputes itself."""
    b = self.bwd.jaxpr
    to_x, rest = self._split
    made_in_b = {v for e in to_x for v in e.outvars} | {b.invars[-1]}
    read = _vars([v for e in rest for v in e.invars] + list(b.outvars[:-1]))
    return list(dict.fromkeys(v for v in read if v in made_in_b))

  def input_grad(self, w: Any, aux: Any, stash: list, g: jax.Array) -> tuple[jax.Array, list]:
    to_x, _ = self._split
    env = self._bwd_env(w, aux, stash, g, to_x)
    run_eqns(to_x, env)
    return _read(env, self.bwd.jaxpr.outvars[-1]), [env[v] for v in self._carry_vars]

  def weight_grad(self, w: Any, aux: Any, stash: list, carry: list) -> Any:
    b = self.bwd.jaxpr
    _, rest = self._split
    carried = dict(zip(self._carry_vars, carry))
    used = set(_vars(v for e in rest for v in e.invars)) | set(_vars(b.outvars[:-1]))
    wanted = [k for k, v in enumerate(b.invars[:-1]) if v in used and v not in carried]
    env = dict(zip(b.constvars, self.bwd.consts)) | carried
    env.update(zip([b.invars[k] for k in wanted], self._residuals(w, aux, stash, wanted)))
    run_eqns(rest, env)
    return jax.tree.unflatten(self.w_tree, [_read(env, v) for v in b.outvars[:-1]])


def layer_vjp(layer_fn: Callable, w: Any, aux: Any, x: jax.Array, policy: Callable | None = None) -> LayerVjp:
  """Traces ``layer_fn(w, aux, x) -> y`` (``y`` like ``x``) and its VJP at these types: a ``LayerVjp``.

  Args:
    layer_fn: one layer; differentiated in ``w`` and ``x``, not in ``aux`` (keys, indices).
    w, aux, x: arrays (or tracers, or ``jax.ShapeDtypeStruct``s) of the types it will run on.
    policy: a ``jax.checkpoint`` policy choosing which activation-dependent residuals the forward
      stashes (the rest are recomputed in the backward); None: all of them.
  """
  box = {}

  def fwd(w, aux, x):
    y, pullback = jax.vjp(lambda w, x: layer_fn(w, aux, x), w, x)
    leaves, box["pullback"] = jax.tree.flatten(pullback)
    return y, *leaves

  fwd_jaxpr = flat_jaxpr(fwd, w, aux, x)
  j = fwd_jaxpr.jaxpr
  w_leaves, w_tree = jax.tree.flatten(w)
  # the avals (varying mesh axes included, inside shard_map) of the residuals and of y's cotangent
  bwd_jaxpr = flat_jaxpr(lambda res, g: jax.tree.leaves(jax.tree.unflatten(box["pullback"], res)(g)),
                         [v.aval for v in j.outvars[1:]], j.outvars[0].aval)
  x_var = j.invars[-1]
  dep = depends_on(j, [x_var])
  residuals = [v for v in _vars(j.outvars[1:]) if v in dep]
  # what may be stashed: x and the activation-dependent values the policy saves (as jax.checkpoint would)
  saveable = {x_var} | {v for e in j.eqns if saves(policy, e) for v in e.outvars if v in dep}
  recompute = needed(j.eqns, residuals, saveable | set(j.invars) | set(j.constvars))
  read = _vars(v for e in recompute for v in e.invars)
  stash = [v for v in residuals + read if v in saveable]
  return LayerVjp(fwd=fwd_jaxpr, bwd=bwd_jaxpr, w_tree=w_tree, n_w=len(w_leaves), n_aux=len(jax.tree.leaves(aux)),
                  stash=tuple(dict.fromkeys(stash)))
