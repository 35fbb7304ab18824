"""Config sections that name a Python callable: a bundled name, an optax function or an import path
(``"package.module:function"``), called with the section's other keys as keyword arguments.

Checked when the config is read (the callable imported, every key a parameter of it, the required ones given),
called when the run is built. In ``[optimizer]`` a table with a ``name`` is itself a call, resolved in optax
(``learning_rate = {name = "warmup_cosine_decay_schedule", ...}``, ``args = [{name = "clip_by_global_norm",
...}, ...]`` for ``optax.chain``'s ``*args``).
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from typing import Any, Callable, Mapping, Sequence


class ConfigError(ValueError):
  """A configuration file or override is invalid; the message says what to change."""


def suggest(key: str, valid: Sequence[str]) -> list[str]:
  return difflib.get_close_matches(key, list(valid), n=1)


def unknown_key(where: str, key: str, valid: Sequence[str], hint: Sequence[str] = ()) -> ConfigError:
  """``Unknown key in [model]: 'hiden'. Valid keys: hidden, name. Did you mean 'hidden'?``"""
  hint = list(hint) or suggest(key, valid)
  return ConfigError(f"Unknown key {where}{key!r}. Valid keys: {', '.join(sorted(valid))}"
                     + (f". Did you mean {' or '.join(map(repr, hint))}?" if hint else "."))


def import_path(where: str, path: str) -> Callable:
  """The callable at ``"package.module:attribute"`` (the attribute may be dotted, ``"module:Class.build"``).

  A module that is not importable is looked for in the current directory too (as ``python -m`` would find
  it), so ``jdist train`` run next to ``mypkg/`` imports ``mypkg.models``.
  """
  module_name, _, attr = path.partition(":")
  if not module_name or not attr or " " in path:
    raise ConfigError(f"{where} = {path!r} is not an import path; write 'package.module:function', e.g. "
                      f"'mypkg.models:build'.")
  try:
    module = _import(module_name)
  except ModuleNotFoundError as e:
    raise ConfigError(f"{where} = {path!r}: no module named {e.name!r}. Install the package, or run jdist from the "
                      f"directory that holds it (it is searched), or add that directory to PYTHONPATH.") from None
  except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say so in one line
    raise ConfigError(f"{where} = {path!r}: importing {module_name!r} failed with {type(e).__name__}: {e}") from None
  obj: Any = module
  for i, part in enumerate(attr.split(".")):
    if not hasattr(obj, part):
      owner = ".".join([module_name, *attr.split(".")[:i]])
      names = [n for n in dir(obj) if not n.startswith("_")]
      hint = suggest(part, names)
      better = f"{module_name}:{'.'.join([*attr.split('.')[:i], hint[0]])}" if hint else ""
      raise ConfigError(f"{where} = {path!r}: {owner} has no attribute {part!r}"
                        + (f"; did you mean {better!r}?" if hint else "."))
    obj = getattr(obj, part)
  if not callable(obj):
    raise ConfigError(f"{where} = {path!r} is a {type(obj).__name__}, not a function or class to call.")
  return obj


def _import(module_name: str):
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    cwd = os.getcwd()
    # only a missing top-level package is retried: a module that itself fails to import says so
    if e.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
      raise
    sys.path.append(cwd)
    return importlib.import_module(module_name)


def resolve(where: str, name: Any, bundled: Mapping[str, Callable], *, what: str, namespace: Any = None) -> Callable:
  """``name`` as a callable: an import path (with ``:``), a key of ``bundled``, or a (dotted) attribute of
  ``namespace`` (optax: ``"adamw"``, ``"contrib.muon"``)."""
  if not isinstance(name, str):
    raise ConfigError(f"{where} must be a string (a name or an import path 'package.module:function'), got "
                      f"{name!r}.")
  if ":" in name:
    return import_path(where, name)
  if name in bundled:
    return bundled[name]
  if namespace is not None:
    obj = namespace
    for part in name.split("."):
      obj = getattr(obj, part, None)
    if callable(obj) and not name.startswith("_"):
      return obj
  choices = list(bundled) or [n for n in dir(namespace) if not n.startswith("_") and callable(getattr(namespace, n))]
  hint = suggest(name, choices)
  listed = f"one of {list(bundled)}" if bundled else what
  raise ConfigError(f"Unknown {where}: {name!r}. It needs to be {listed} or an import path "
                    f"'package.module:function'" + (f"; did you mean {hint[0]!r}?" if hint else "."))


class Signature:
  """The keyword arguments a callable takes, read once: its named parameters, whether it takes ``**kwargs``, the
  name of its ``*args`` (given as a list), and the required ones."""

  def __init__(self, fn: Callable, skip: int = 0):
    try:
      params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: accept any key
      params = []
      self.any_key = True
    else:
      self.any_key = any(p.kind == p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    self.skipped = [p.name for p in named[:skip]]  # the positional arguments jdist passes (params, batch, key)
    named = named[skip:]
    self.names = [p.name for p in named if p.kind != p.POSITIONAL_ONLY]
    self.var_positional = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    self.required = [p.name for p in named if p.default is p.empty]

  def takes(self, name: str) -> bool:
    return name in self.names or self.any_key


def check_keys(where: str, section: str, sig: Signature, kwargs: Mapping[str, Any], own: Sequence[str],
               given: Sequence[str] = (), namespace: Any = None) -> None:
  """Every key of ``kwargs`` is a parameter of the callable (``own`` keys are jdist's, not the callable's), and every
  required parameter is in ``kwargs`` or ``given`` (what jdist passes itself, e.g. ``key``). With ``namespace``
  (optax), an unknown key that another of its functions takes says which ones."""
  valid = [*own, *(n for n in sig.names if n not in given), *([sig.var_positional] if sig.var_positional else [])]
  for key in kwargs:
    if key not in valid and not sig.any_key:
      error = unknown_key(f"in [{section}]: ", key, valid)
      if suggest(key, valid) or namespace is None:
        raise error if suggest(key, valid) else ConfigError(f"{error} Drop it (CLI: --unset {section}.{key}).")
      raise ConfigError(f"{error}{_elsewhere(key, where, section, namespace)}")
  missing = [n for n in sig.required if n not in kwargs and n not in given]
  if missing:
    it = "it" if len(missing) == 1 else "them"
    raise ConfigError(f"[{section}] {where} needs {', '.join(map(repr, missing))}: add {it} to [{section}] (CLI: "
                      f"--set {section}.{missing[0]}=...).")
  if sig.var_positional and sig.var_positional in kwargs and not isinstance(kwargs[sig.var_positional], list):
    raise ConfigError(f"{section}.{sig.var_positional} must be a list (the positional arguments of {where}), got "
                      f"{kwargs[sig.var_positional]!r}.")


_PARAMETERS: dict[int, dict[str, list[str]]] = {}  # id(namespace) -> parameter name -> the functions taking it


def _elsewhere(key: str, where: str, section: str, namespace: Any) -> str:
  """`` 'momentum' is an argument of optax.sgd, ...: change the name or drop it``, for a key this function lacks;
  a misspelt one (``weight_decy``) is first matched to the closest parameter of any function of ``namespace``."""
  if id(namespace) not in _PARAMETERS:
    table: dict[str, list[str]] = {}
    for name in dir(namespace):
      fn = getattr(namespace, name)
      if not name.startswith("_") and callable(fn) and not isinstance(fn, type):
        for param in Signature(fn).names:
          table.setdefault(param, []).append(name)
    _PARAMETERS[id(namespace)] = table
  table = _PARAMETERS[id(namespace)]
  meant = key if key in table else next(iter(suggest(key, list(table))), None)
  drop = f"drop it (CLI: --unset {section}.{key})"
  if meant is None:
    return f" Drop it (CLI: --unset {section}.{key})."
  current = where.split("=", 1)[-1].strip(" '\"")
  takers = sorted(table[meant], key=lambda n: (-difflib.SequenceMatcher(None, n, current).ratio(), len(n)))[:3]
  prefix = namespace.__name__.split(".")[0]
  listed = ", ".join(f"{prefix}.{n}" for n in takers)
  if meant != key:
    return f" Did you mean {meant!r}? It is an argument of {listed}, not of {prefix}.{current}."
  return f" {key!r} is an argument of {listed}, not of {prefix}.{current}: change {section}.name, or {drop}."


def is_call(value: Any) -> bool:
  return isinstance(value, Mapping) and "name" in value


def check_optax_tree(section: str, value: Any, optax_module: Any) -> None:
  """The nested calls of an ``[optimizer]`` value (tables with a ``name``, in lists too) resolved in optax and
  their keys checked; ``section`` is where the value sits (``optimizer.args.1``)."""
  if isinstance(value, list):
    for i, item in enumerate(value):
      check_optax_tree(f"{section}.{i}", item, optax_module)
  elif is_call(value):
    fn = resolve(f"{section}.name", value["name"], {}, what="a function of optax", namespace=optax_module)
    kwargs = {k: v for k, v in value.items() if k != "name"}
    check_keys(f"name = {value['name']!r}", section, Signature(fn), kwargs, ("name",), namespace=optax_module)
    for key, item in kwargs.items():
      check_optax_tree(f"{section}.{key}", item, optax_module)
  elif isinstance(value, Mapping):
    for key, item in value.items():
      check_optax_tree(f"{section}.{key}", item, optax_module)


def build_optax_tree(value: Any, optax_module: Any) -> Any:
  """``value`` with every nested call made (inner calls first); ``*args`` given as a list are passed positionally."""
  if isinstance(value, list):
    return [build_optax_tree(v, optax_module) for v in value]
  if not is_call(value):
    return value
  fn = resolve("name", value["name"], {}, what="a function of optax", namespace=optax_module)
  return call(fn, {k: build_optax_tree(v, optax_module) for k, v in value.items() if k != "name"})


def call(fn: Callable, kwargs: Mapping[str, Any], *args: Any) -> Any:
  """``fn(*args, **kwargs)``, the list under the name of its ``*args`` (if any) passed positionally after ``args``."""
  sig = Signature(fn)
  kwargs = dict(kwargs)
  rest = kwargs.pop(sig.var_positional, []) if sig.var_positional else []
  return fn(*args, *rest, **kwargs)
