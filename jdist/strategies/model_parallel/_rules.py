"""Sharding rules as data: (pattern on the parameter path) -> PartitionSpec over mesh axes.

``partition_specs`` is one pure function from a params pytree (arrays or shapes), the rules and the
mesh's axis sizes to a pytree of ``PartitionSpec``s. It needs no devices: pass the axis sizes as a dict
(``{"data": 2, "model": 4}``) to test rules on a laptop for a cluster's mesh.

A parameter's path is its keys joined by "/" (``blocks/qkv``, ``layers/0/w``); a rule's pattern is a
regular expression searched in it, and in the path without a trailing ``/value`` (flax NNX state ends each
path with the Variable's ``value``: ``l1/kernel/value``), so ``kernel$`` matches an NNX kernel too.
``rules_from_flax`` makes rules from a flax model's own annotations (``nnx.with_partitioning``). Every rule
that matches a parameter must give the same spec (two that disagree are an error naming both), and every rule
must match some parameter; a parameter no rule matches is replicated and listed in the report. FSDP then adds
its axis to the largest free dimension of every parameter big enough.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jdist._types import Params, PyTree
from jdist.errors import AxisError, OptionError, OptionTypeError, RuleError

Rule = tuple[str, Any]  # (regex on the path, PartitionSpec or tuple of axis names / None / tuples)
DEFAULT_FSDP_MIN_SIZE = 1024  # parameters with fewer elements stay replicated under FSDP


def path_str(path) -> str:
  """``(DictKey('blocks'), DictKey('qkv'))`` -> ``"blocks/qkv"``."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _axis_sizes(mesh: Any) -> dict[str, int]:
  if isinstance(mesh, Mapping):
    bad = {k: v for k, v in mesh.items() if not isinstance(k, str) or isinstance(v, bool)
           or not isinstance(v, (int, np.integer)) or v < 1}
    if bad:
      raise OptionError("mesh", bad, "a dict of axis names to their sizes (positive ints), e.g. {'model': 4}")
    return dict(mesh)
  if not isinstance(getattr(mesh, "shape", None), Mapping):
    raise OptionTypeError("mesh", mesh, "a jax.sharding.Mesh or a dict of axis sizes, e.g. {'model': 4}")
  return dict(mesh.shape)


def check_min_size(value: Any, what: str = "fsdp_min_size") -> int:
  """``value`` as the smallest number of elements a parameter needs to be sharded by FSDP (an int >= 0)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise OptionError(what, value, "a non-negative int (the fewest elements a parameter needs to be split over the "
                      "FSDP axis; smaller ones stay whole)", f"The default is {DEFAULT_FSDP_MIN_SIZE}.")
  return int(value)


def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """What ``partition_specs`` decided: the spec of every parameter, which rule set it, what was left replicated."""

  specs: dict[str, P]
  shapes: dict[str, tuple[int, ...]]
  itemsizes: dict[str, int]
  matched_by: dict[str, str | None]
  unmatched: list[str]
  fsdp_added: list[str]
  axis_sizes: dict[str, int]

  def bytes_per_device(self, name: str) -> int:
    shape, spec = self.shapes[name], self.specs[name]
    per = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      per *= dim // math.prod(self.axis_sizes[a] for a in _entry_axes(entry))
    return per * self.itemsizes[name]

  def table(self) -> str:
    rows = [f"{'parameter':<28}{'shape':<20}{'spec':<34}{'bytes/device':>14}"]
    total = 0
    for name in self.specs:
      b = self.bytes_per_device(name)
      total += b
      spec = str(tuple(self.specs[name])) if len(self.specs[name]) else "replicated"
      rows.append(f"{name:<28}{str(self.shapes[name]):<20}{spec:<34}{b:>14,}")
    full = sum(math.prod(s) * self.itemsizes[n] for n, s in self.shapes.items())
    rows.append(f"{'total':<28}{'':<20}{'':<34}{total:>14,}  ({total / max(full, 1):.3f} of unsharded {full:,})")
    alone = [n for n in self.unmatched if n not in self.fsdp_added]
    if alone:
      rows.append(f"replicated (no rule matched, not sharded by FSDP): {', '.join(alone)}")
    return "\n".join(rows)


def _normalise(spec: Any, rule: str) -> P:
  """``spec`` as a ``PartitionSpec``, each entry None, an axis name or a tuple of names, no axis twice."""
  if not isinstance(spec, (P, tuple, list)):
    raise RuleError(f"Rule {rule!r} has spec {spec!r}, not a PartitionSpec; give a tuple of mesh axis names or None "
                    f"per dimension.", rule)
  for i, entry in enumerate(spec):
    if not (entry is None or isinstance(entry, str)
            or (isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry))):
      raise RuleError(f"Rule {rule!r} has spec {tuple(spec)}, whose entry {i} ({entry!r}) is not a mesh axis name; "
                      f"make each entry None (replicated), an axis name or a tuple of axis names.", rule)
  named = [a for entry in spec for a in _entry_axes(entry)]
  twice = sorted({a for a in named if named.count(a) > 1})
  if twice:
    raise RuleError(f"Rule {rule!r} has spec {tuple(spec)}, which uses mesh axis {twice[0]!r} more than once; name "
                    f"each axis once (a mesh axis splits one dimension of a parameter).", rule)
  return spec if isinstance(spec, P) else P(*spec)


def _pattern_and_spec(rule: Any) -> tuple[str, P]:
  """A rule's pattern and its spec as a ``PartitionSpec`` (``_normalise``), or a ``RuleError`` for a malformed rule."""
  if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
    raise RuleError(f"Rule {rule!r} is not a (pattern, spec) pair; write it as (regex, (axis or None, ...)).", rule)
  return rule[0], _normalise(rule[1], rule[0])


def rule_axes(rules: Sequence[Rule]) -> set[str]:
  """The mesh axes the rules' specs name (a malformed rule raises, as in ``partition_specs``)."""
  return {a for rule in rules for entry in _pattern_and_spec(rule)[1] for a in _entry_axes(entry)}


def _canonical(spec: P) -> tuple:
  """A spec as a tuple of axis-name tuples, trailing replicated dims dropped: P("model") == P(("model",), None)."""
  entries = [_entry_axes(e) for e in spec]
  while entries and not entries[-1]:
    entries.pop()
  return tuple(entries)


def partition_specs(params: Params, rules: Sequence[Rule], mesh: Any, *, fsdp_axis: str | None = None,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> tuple[PyTree, ShardingReport]:
  """The ``PartitionSpec`` of every parameter under ``rules`` (and FSDP), checked against ``mesh``.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct``s.
    rules: ``(pattern, spec)`` pairs; ``spec`` entries name mesh axes (or tuples of them) per dimension.
    mesh: a ``Mesh`` or a dict of axis sizes.
    fsdp_axis: shard every parameter of at least ``fsdp_min_size`` elements over this axis too, on its
      largest dimension that is not yet sharded and divides by the axis size.

  Returns:
    ``(specs, report)``: a pytree of ``PartitionSpec`` shaped like ``params`` and a ``ShardingReport``.

  Raises:
    RuleError: a malformed rule; a rule that names an axis not in the mesh, has more entries than the parameter
      has dimensions, shards a dimension that is not divisible, or matches no parameter; two matching rules
      that disagree. AxisError: the FSDP axis is not in the mesh. OptionError / OptionTypeError: a bad mesh or
      ``fsdp_min_size``.

  Example:
    >>> specs, report = partition_specs({"w": np.zeros((8, 4))}, [("w", (None, "model"))], {"model": 4})
    >>> specs["w"]
    P(None, 'model')
  """
  sizes = _axis_sizes(mesh)
  fsdp_min_size = check_min_size(fsdp_min_size)
  compiled = _compile_rules(rules, sizes)
  if fsdp_axis is not None and fsdp_axis not in sizes:
    raise AxisError(f"fsdp_axis {fsdp_axis!r} is not an axis of the mesh {sizes}; pass one of {list(sizes)}.",
                    fsdp_axis, sizes)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  decisions = [_decide(path_str(path), leaf, compiled, sizes, fsdp_axis, fsdp_min_size) for path, leaf in leaves]
  shapes = {d.name: d.shape for d in decisions}
  used = {pattern for d in decisions for pattern in d.hits}
  unused = [pattern for pattern, _, _ in compiled if pattern not in used]
  if unused:  # a typo or a rule for another model: the weights it meant would silently stay replicated
    raise RuleError(f"Sharding rule(s) {unused} match no parameter. The parameter paths are: {', '.join(shapes)}. "
                    f"Fix the pattern (a regular expression searched in the path) or drop the rule.", tuple(unused))
  report = ShardingReport(specs={d.name: d.spec for d in decisions}, shapes=shapes,
                          itemsizes={d.name: d.itemsize for d in decisions},
                          matched_by={d.name: d.hits[0] if d.hits else None for d in decisions},
                          unmatched=[d.name for d in decisions if not d.hits],
                          fsdp_added=[d.name for d in decisions if d.fsdp_added], axis_sizes=sizes)
  return jax.tree.unflatten(treedef, [d.spec for d in decisions]), report


def _compile_rules(rules: Sequence[Rule], sizes: dict[str, int]) -> list[tuple[str, re.Pattern, P]]:
  """``(pattern, compiled regex, spec)`` per rule, each checked against the mesh's axes."""
  compiled = []
  for rule in rules:
    pattern, spec = _pattern_and_spec(rule)
    for entry in spec:
      for a in _entry_axes(entry):
        if a not in sizes:
          raise RuleError(f"Rule {pattern!r} -> {tuple(spec)} names mesh axis {a!r}, but the mesh has axes {sizes}. "
                          f"Use one of {list(sizes)} or add the axis to the mesh.", pattern)
    try:
      compiled.append((pattern, re.compile(pattern), spec))
    except re.error as e:
      raise RuleError(f"Rule pattern {pattern!r} is not a valid regular expression ({e}); fix or escape it.",
                      pattern) from None
  return compiled


class _Decision(NamedTuple):
  """What ``partition_specs`` decided for one parameter."""

  name: str  # its path, "blocks/qkv"
  shape: tuple[int, ...]
  itemsize: int
  hits: tuple[str, ...]  # the patterns of the rules that match it (all give the same spec)
  spec: P
  fsdp_added: bool  # FSDP split one more dimension over its axis


def _decide(name: str, leaf: Any, compiled: list, sizes: dict[str, int], fsdp_axis: str | None,
            fsdp_min_size: int) -> _Decision:
  """One parameter's spec: the matching rules' (which must agree), plus the FSDP axis on its largest free
  dimension that divides, if it is big enough; every split checked to divide its dimension."""
  shape = tuple(int(d) for d in np.shape(leaf))
  bare = name[:-len("/value")] if name.endswith("/value") else name  # an NNX Variable's path, without its field
  hits = [(pattern, spec) for pattern, regex, spec in compiled if regex.search(name) or regex.search(bare)]
  if len({_canonical(s) for _, s in hits}) > 1:
    listing = "; ".join(f"{p!r} -> {tuple(s)}" for p, s in hits)
    raise RuleError(f"Parameter {name} {shape} is matched by rules with different specs: {listing}. Make the "
                    f"patterns disjoint (e.g. anchor them with ^...$).", hits[0][0], name)
  rule, spec = hits[0] if hits else (None, P())
  if len(spec) > len(shape):
    raise RuleError(f"Rule {rule!r} gives {tuple(spec)} ({len(spec)} entries) for parameter {name} of shape {shape} "
                    f"({len(shape)} dimensions); give at most one entry per dimension.", rule, name)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  added = False
  if fsdp_axis is not None and math.prod(shape) >= fsdp_min_size and fsdp_axis not in (
      a for e in entries for a in _entry_axes(e)):
    free = [d for d in range(len(shape)) if entries[d] is None and shape[d] % sizes[fsdp_axis] == 0]
    if free:
      entries[max(free, key=lambda i: shape[i])] = fsdp_axis
      added = True
  for d, entry in enumerate(entries):
    div = math.prod(sizes[a] for a in _entry_axes(entry))
    if shape[d] % div:
      raise RuleError(f"Parameter {name} has shape {shape}; dimension {d} (size {shape[d]}) is sharded over "
                      f"{_entry_axes(entry)} of sizes {[sizes[a] for a in _entry_axes(entry)]} (= {div}), which does "
                      f"not divide it. Change the rule or the mesh.", rule, name)
  while entries and entries[-1] is None:
    entries.pop()
  return _Decision(name, shape, np.dtype(leaf.dtype).itemsize, tuple(p for p, _ in hits), P(*entries), added)


def explain_sharding(params: Params, rules: Sequence[Rule], mesh: Any, *, fsdp_axis: str | None = None,
                     fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE, print_fn=print) -> ShardingReport:
  """Prints a table: parameter, shape, spec, bytes per device (and what stayed replicated)."""
  _, report = partition_specs(params, rules, mesh, fsdp_axis=fsdp_axis, fsdp_min_size=fsdp_min_size)
  if print_fn is not None:
    print_fn(report.table())
  return report


LogicalRule = tuple[str, Any]  # (logical axis name, mesh axis, tuple of mesh axes, or None)


def rules_from_flax(model: Any, logical_rules: Sequence[LogicalRule] = ()) -> tuple[Rule, ...]:
  """jdist sharding rules from a flax NNX model's annotations (``nnx.with_partitioning``, logical axis names).

  Each annotated parameter becomes one rule, its path anchored (``^l1/kernel$``, which matches the NNX state's
  ``l1/kernel/value`` too), its spec the annotation with every logical name mapped to mesh axes by
  ``logical_rules``, as flax's ``logical_to_mesh_axes`` does: ordered ``(logical name, mesh axis or tuple of axes
  or None)`` pairs, the first for a name whose axes no earlier dimension of the parameter uses (MaxText's
  ``logical_axis_rules``). Without logical rules the annotations name mesh axes; a parameter's own
  ``sharding_rules`` metadata comes before ``logical_rules``. Unannotated parameters get no rule (replicated, or
  split by FSDP). Build the model with ``nnx.use_eager_sharding(False)`` so that flax only records the
  annotations and jdist places the parameters.

  Args:
    model: an ``nnx.Module``, or its ``nnx.State`` (e.g. from ``nnx.split(model, nnx.Param, ...)``).
    logical_rules: the table from logical axis names to mesh axes; rules naming no annotation are allowed (a
      shared table also holds activation names).

  Returns:
    A tuple of ``(pattern, PartitionSpec)`` rules for ``jdist.sharded(..., rules=...)`` / ``partition_specs``.

  Raises:
    RuleError: a logical name that no rule maps (a typo would leave the parameter replicated); a malformed
      logical rule. OptionTypeError: ``model`` holds no flax Variables.

  Example:
    >>> with nnx.use_eager_sharding(False):                                       # doctest: +SKIP
    ...   model = MLP(rngs=nnx.Rngs(0))  # kernels annotated ("embed", "mlp") / ("mlp", "embed")
    >>> rules = jdist.rules_from_flax(model, [("embed", "fsdp"), ("mlp", "model")])  # doctest: +SKIP
  """
  from flax import nnx

  table = _logical_table(logical_rules)
  state = nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model
  is_var = lambda x: isinstance(x, nnx.Variable)
  variables = [(path_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
               if is_var(v)]
  if not variables:
    raise OptionTypeError("model", model, "a flax nnx.Module or its nnx.State (holding nnx.Param variables)")
  rules = []
  for name, var in variables:
    names = var.get_metadata().get("out_sharding")
    if names:
      local = _logical_table(var.get_metadata().get("sharding_rules") or ())
      rules.append((f"^{re.escape(name)}$", _mesh_spec(name, tuple(names), local + table)))
  return tuple(rules)


def _logical_table(logical_rules: Any) -> list[tuple[str, tuple[str, ...]]]:
  """``(logical name, mesh axes)`` pairs, checked (None: no axes)."""
  table = []
  for rule in logical_rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    axes = rule[1] if ok else None
    if not ok or not (axes is None or isinstance(axes, str) or (isinstance(axes, (tuple, list))
                                                                and all(isinstance(a, str) for a in axes))):
      raise RuleError(f"Logical rule {rule!r} is not a (logical name, mesh axis or tuple of axes or None) pair, "
                      f"e.g. ('mlp', 'model').", rule)
    table.append((rule[0], _entry_axes(axes)))
  return table


def _mesh_spec(param: str, names: tuple, table: list[tuple[str, tuple[str, ...]]]) -> P:
  """One parameter's logical annotation as mesh axes: per dimension the first rule for its name whose axes are
  not used by an earlier dimension (else that dimension stays whole)."""
  used: set[str] = set()
  entries = []
  for entry in names:
    axes: list[str] = []
    for logical in _entry_axes(entry):
      if not table:  # no logical rules: the annotation names mesh axes
        axes.append(logical)
        continue
      candidates = [axs for n, axs in table if n == logical]
      if not candidates:
        known = sorted({n for n, _ in table})
        raise RuleError(f"Parameter {param} is annotated with logical axis {logical!r}, which no logical rule maps "
                        f"to mesh axes (rules name {known}); add ({logical!r}, mesh axis or None) to the logical "
                        f"rules.", logical, param)
      axes.extend(next((axs for axs in candidates if not used & set(axs)), ()))
    used.update(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*entries)
