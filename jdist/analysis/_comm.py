"""What a compiled program communicates: every collective in its HLO, with bytes sent per device."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_GROUPS = re.compile(r"replica_groups=\{(\{[0-9,{}\s]*\})\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_PAIRS = re.compile(r"source_target_pairs=\{([0-9,{}\s]*)\}")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(")
_WHILE_BODY = re.compile(r"\bwhile\(.*body=%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLED = re.compile(r"(?:calls|to_apply|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")


def _multipliers(text: str) -> tuple[dict[str, int], bool]:
  """How many times each computation runs per call of the entry: while bodies run their trip count."""
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      computations[current] = []
      if m.group(1):
        entry = current
    elif current is not None:
      computations[current].append(line)
  edges: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}
  unknown = False
  for name, lines in computations.items():
    for line in lines:
      w = _WHILE_BODY.search(line)
      if w:
        trip = _TRIP_COUNT.search(line)
        unknown = unknown or trip is None
        edges[name].append((w.group(1), int(trip.group(1)) if trip else 1))
        continue
      for m in _CALLED.finditer(line):  # every branch of a conditional counts, as if each ran
        for callee in _NAME.findall(m.group(1)):
          edges[name].append((callee, 1))
  mult: dict[str, int] = {}

  def visit(name: str, factor: int, depth: int = 0) -> None:
    if depth > 64 or name not in computations:
      return
    mult[name] = mult.get(name, 0) + factor
    for callee, n in edges[name]:
      visit(callee, factor * n, depth + 1)

  if entry is not None:
    visit(entry, 1)
  return mult, unknown


def _array_bytes(text: str) -> list[int]:
  """Bytes of each array in a (possibly tuple) HLO shape, in order; ``u32[]`` scalars included."""
  return [_DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
          for dtype, dims in _ARRAY.findall(text) if dtype in _DTYPE_BYTES]


def _shape_bytes(text: str) -> int:
  return sum(_array_bytes(text))


def _start_result_bytes(kind: str, shape_text: str) -> int:
  """The result bytes of an async ``<kind>-start``: an all-reduce-start's shape is its result; an
  all-gather-start's or collective-permute-start's is (operands..., results..., [u32[] contexts])."""
  if kind == "all-reduce" or not shape_text.lstrip().startswith("("):
    return _shape_bytes(shape_text)
  arrays = _array_bytes(shape_text)
  scalars = len(re.findall(r"\bu32\[\]", shape_text)) if kind == "collective-permute" else 0
  arrays = arrays[:len(arrays) - scalars]  # the permute's context scalars are not data
  return sum(arrays[len(arrays) // 2:])


def _group_size(line: str, default: int) -> int:
  m = _MESH_GROUPS.search(line)  # replica_groups=mesh['data'=8,'model'=1] {'data'}
  if m:
    sizes = {k.strip().strip("'\""): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(",") if "=" in kv)}
    return int(np.prod([sizes[a.strip().strip("'\"")] for a in m.group(2).split(",") if a.strip()] or [1]))
  m = _IOTA_GROUPS.search(line)
  if m:
    return int(m.group(2))
  m = _GROUPS.search(line)
  if m:
    first = re.search(r"\{([0-9,\s]*)\}", m.group(1))
    if first and first.group(1).strip():
      return len(first.group(1).split(","))
  return default


@dataclasses.dataclass(frozen=True)
class CollectiveStat:
  """All collectives of one kind: how many, their total result bytes and the bytes each device sends."""

  kind: str
  count: int
  payload_bytes: int
  sent_bytes: float


@dataclasses.dataclass(frozen=True)
class CommReport:
  """Collectives found in a compiled program (per device, per call).

  Collectives inside a loop body (``lax.scan`` over layers, say) are counted once per iteration, using
  the trip count XLA records; ``unknown_trip_counts`` is True if some loop had none (counted once).

  ``sent_bytes`` counts what one device puts on the wire under bandwidth-optimal algorithms: an
  all-gather (N-1)/N of its result; a reduce-scatter (N-1)/N of its input; an all-to-all (N-1)/N of its
  operand; an all-reduce 2(N-1)/N of its payload (reduce-scatter then all-gather), with N the size of
  the replica group. A collective-permute sends its operand from each source device only; its figure
  is that of the device that sends the most over the whole program (the busiest, e.g. a tree's root).
  The branches of a conditional are all counted, as if each ran (an upper bound).
  """

  stats: dict[str, CollectiveStat]
  unknown_trip_counts: bool = False

  @property
  def total_sent_bytes(self) -> float:
    return sum(s.sent_bytes for s in self.stats.values())

  @property
  def total_count(self) -> int:
    return sum(s.count for s in self.stats.values())

  def __getitem__(self, kind: str) -> CollectiveStat:
    if kind not in COLLECTIVES:
      raise KeyError(f"{kind!r} is not a collective comm_report counts; it needs to be one of {list(COLLECTIVES)}.")
    return self.stats.get(kind, CollectiveStat(kind, 0, 0, 0.0))

  def table(self) -> str:
    rows = [f"{'collective':<20}{'count':>7}{'payload bytes':>16}{'sent bytes/device':>20}"]
    for kind in COLLECTIVES:
      s = self[kind]
      if s.count:
        rows.append(f"{kind:<20}{s.count:>7}{s.payload_bytes:>16,}{s.sent_bytes:>20,.0f}")
    rows.append(f"{'total':<20}{self.total_count:>7}{'':>16}{self.total_sent_bytes:>20,.0f}")
    return "\n".join(rows)


def comm_report(compiled: Any, *, num_devices: int | None = None) -> CommReport:
  """Lists the collectives of a compiled (or lowered) jitted function, or of its HLO text.

  Args:
    compiled: ``jax.jit(f).lower(...).compile()``, a ``Lowered`` (compiled here), or compiled HLO text
      (``compiled.as_text()``). HLO text from before partitioning (``lowered.as_text(dialect="hlo")``)
      holds no collectives yet: its report is empty.
    num_devices: group size to assume where the HLO names no replica groups.

  Returns:
    A ``CommReport``; ``report.table()`` formats it.

  Example:
    >>> report = comm_report(strategy.step.lower(state, batch).compile())  # doctest: +SKIP
  """
  if not isinstance(compiled, str) and hasattr(compiled, "compile"):
    compiled = compiled.compile()  # a Lowered: its own text would be StableHLO, not the partitioned HLO
  if not isinstance(compiled, str) and not hasattr(compiled, "as_text"):
    raise TypeError(f"comm_report takes a compiled or lowered function (jax.jit(f).lower(*args), or a strategy's "
                    f"strategy.step.lower(state, batch)) or its compiled HLO text, got a {type(compiled).__name__}.")
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  if "HloModule" not in text and ("stablehlo." in text or "func.func" in text):
    raise ValueError("comm_report was given StableHLO text (Lowered.as_text()), which holds no partitioned "
                     "collectives yet; pass the Lowered itself, or the compiled HLO: lowered.compile().as_text().")
  partitions = _PARTITIONS.search(text)
  default = num_devices or (int(partitions.group(1)) if partitions else 1)
  multipliers, unknown = _multipliers(text)
  acc: dict[str, list[float]] = {}
  permute_sent: dict[int, float] = {}  # device -> bytes it sends in collective-permutes
  permute_all = 0.0  # permutes whose pairs the text does not list: charged to every device
  current = None
  for line in text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      current = c.group(2)
      continue
    m = _OP.match(line)
    if not m:
      continue
    times = multipliers.get(current, 1) if multipliers else 1
    shape_text, kind, started = m.group(1), m.group(2), m.group(3)
    out_bytes = _start_result_bytes(kind, shape_text) if started else _shape_bytes(shape_text)
    n = _group_size(line, default)
    if kind == "collective-permute":
      pairs = _PAIRS.search(line)
      if pairs is None:
        permute_all += out_bytes * times
      for source in {int(a) for a, _ in re.findall(r"\{(\d+),\s*(\d+)\}", pairs.group(1))} if pairs else ():
        permute_sent[source] = permute_sent.get(source, 0.0) + out_bytes * times
      sent = 0.0  # set below, from the busiest device
    elif kind == "all-reduce":
      sent = 2 * (n - 1) / n * out_bytes
    elif kind == "all-gather":
      sent = (n - 1) / n * out_bytes
    elif kind == "reduce-scatter":
      sent = (n - 1) * out_bytes  # input is N x the result
    else:  # all-to-all
      sent = (n - 1) / n * out_bytes
    c = acc.setdefault(kind, [0, 0, 0.0])
    c[0] += times
    c[1] += out_bytes * times
    c[2] += sent * times
  if "collective-permute" in acc:
    acc["collective-permute"][2] = permute_all + max(permute_sent.values(), default=0.0)
  return CommReport({k: CollectiveStat(k, int(v[0]), int(v[1]), float(v[2])) for k, v in acc.items()}, unknown)
