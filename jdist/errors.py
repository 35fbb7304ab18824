"""The errors jdist raises for bad input: ``ValueError`` / ``TypeError`` subclasses that carry the values.

Catch them as ``ValueError`` / ``TypeError`` like any argument error; tests (and programs that react to a
particular mistake) match the class and read its fields instead of parsing the message.
"""
from __future__ import annotations

from typing import Any, Mapping


class OptionError(ValueError):
  """An argument with a value it may not take.

  Attributes:
    name: the argument (``"accumulate_steps"``). got: the value given. expected: what it may be, in words.
  """

  def __init__(self, name: str, got: Any, expected: str, fix: str = ""):
    self.name, self.got, self.expected = name, got, expected
    super().__init__(f"{name} must be {expected}, got {got!r}." + (f" {fix}" if fix else ""))


class OptionTypeError(TypeError):
  """An argument of the wrong kind (not callable, not an optimizer, not a mesh). Fields as ``OptionError``."""

  def __init__(self, name: str, got: Any, expected: str, fix: str = ""):
    self.name, self.got, self.expected = name, got, expected
    super().__init__(f"{name} must be {expected}, got {type(got).__name__}." + (f" {fix}" if fix else ""))


class AxisError(ValueError):
  """A mesh axis name that is not in the mesh, or named twice.

  Attributes:
    axis: the offending name. mesh_axes: the mesh's axes and their sizes.
  """

  def __init__(self, message: str, axis: str, mesh_axes: Mapping[str, int]):
    self.axis, self.mesh_axes = axis, dict(mesh_axes)
    super().__init__(message)


class IdleAxesError(ValueError):
  """A mesh axis of more than one device that the strategy does not use.

  Attributes:
    problem: the first sentence of the message (what is wrong, without the Python fix).
    idle: the unused axes and their sizes. kept: the axes of the smaller mesh and their sizes.
  """

  def __init__(self, problem: str, fix: str, idle: dict[str, int], kept: dict[str, int]):
    super().__init__(f"{problem} {fix}")
    self.problem, self.idle, self.kept = problem, idle, kept


class BatchError(ValueError):
  """A batch that cannot be split as the strategy needs.

  Attributes:
    sizes: the leading size of each leaf, by path (``{"['x']": 12}``).
    multiple_of: what the global batch size must divide by (devices x micro-batches), 1 when only the
      structure was wrong.
  """

  def __init__(self, message: str, sizes: Mapping[str, int], multiple_of: int = 1):
    self.sizes, self.multiple_of = dict(sizes), multiple_of
    super().__init__(message)


class RuleError(ValueError):
  """A sharding rule that cannot apply: malformed, naming an axis the mesh lacks, matching no parameter,
  disagreeing with another rule on a parameter, or splitting a dimension unevenly.

  Attributes:
    rule: the rule's pattern (a tuple of patterns when several match nothing; the rule itself when it is not a
      ``(pattern, spec)`` pair). param: the parameter path it failed on (``"blocks/qkv"``), or None.
  """

  def __init__(self, message: str, rule: Any, param: str | None = None):
    self.rule, self.param = rule, param
    super().__init__(message)


__all__ = ["AxisError", "BatchError", "IdleAxesError", "OptionError", "OptionTypeError", "RuleError"]
