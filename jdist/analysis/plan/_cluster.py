"""Clusters as data: a device's peak, memory and links, read from TOML files (shipped ones or the user's)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import pathlib
import sys
from typing import Any, Mapping

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib

from jdist.errors import OptionError

CLUSTER_DIR = pathlib.Path(__file__).resolve().parents[1] / "clusters"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
  """One kind of link: what one device sends per second in one direction, and the latency of a ring step."""

  bandwidth: float  # bytes/s per device, one direction
  latency: float  # seconds per step of a ring (alpha)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
  """A cluster of identical devices in nodes: links inside a node (NVLink, a TPU slice's ICI) and between
  nodes (InfiniBand, DCN). ``devices`` is how many are planned for (a file's default, or ``--devices``)."""

  name: str
  device: str  # what the device is, for tables
  peak_flops: float  # dense bf16 FLOP/s per device
  matmul_efficiency: float  # measured matmul rate / peak (a microbenchmark), in (0, 1]
  memory_gib: float  # device memory
  hbm_bandwidth: float  # bytes/s per device
  devices_per_node: int  # devices on the fast intra-node link
  devices: int  # devices planned for
  intra: Link
  inter: Link

  def __post_init__(self):
    for name in ("peak_flops", "memory_gib", "hbm_bandwidth"):
      if not getattr(self, name) > 0:
        raise OptionError(f"cluster {self.name!r}: {name}", getattr(self, name), "a positive number")
    if not 0 < self.matmul_efficiency <= 1:
      raise OptionError(f"cluster {self.name!r}: matmul_efficiency", self.matmul_efficiency, "a number in (0, 1]")
    for name in ("devices_per_node", "devices"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise OptionError(f"cluster {self.name!r}: {name}", getattr(self, name), "a positive int")

  @property
  def nodes(self) -> int:
    return math.ceil(self.devices / self.devices_per_node)

  @property
  def memory_bytes(self) -> float:
    return self.memory_gib * 2**30

  def with_devices(self, devices: int) -> "Cluster":
    return dataclasses.replace(self, devices=int(devices))

  def link(self, size: int, stride: int) -> Link:
    """The link a group of ``size`` devices, ``stride`` apart in device order, runs its collectives over: the
    node's if the whole group sits in one node, else the inter-node one (the slowest hop sets a ring's pace)."""
    return self.intra if size * stride <= self.devices_per_node or size == 1 else self.inter

  def summary(self) -> str:
    return (f"{self.name}: {self.devices} x {self.device} ({self.nodes} node{'s' * (self.nodes > 1)} of "
            f"{min(self.devices, self.devices_per_node)}), {self.peak_flops / 1e12:g} TFLOP/s, "
            f"{self.memory_gib:g} GiB each")


def available_clusters() -> list[str]:
  """Names of the cluster files shipped with jdist."""
  return sorted(p.stem for p in CLUSTER_DIR.glob("*.toml"))


def cluster_from_dict(raw: Mapping[str, Any], where: str = "cluster") -> Cluster:
  """A ``Cluster`` from a dict shaped like the TOML files (``intra`` and ``inter`` tables)."""
  fields = {f.name for f in dataclasses.fields(Cluster)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    hint = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
    raise OptionError(f"{where}: key {unknown[0]!r}", unknown[0], f"one of {sorted(fields)}",
                      f"Did you mean {hint[0]!r}?" if hint else "")
  missing = sorted(fields - set(raw))
  if missing:
    raise OptionError(f"{where}: {missing[0]}", None, "a value (every key of a shipped cluster file is needed)",
                      f"See {CLUSTER_DIR / 'h100-8x.toml'}.")
  values = dict(raw)
  for name in ("intra", "inter"):
    link = values[name]
    if not isinstance(link, Mapping) or set(link) != {"bandwidth", "latency"}:
      raise OptionError(f"{where}: [{name}]", link, "a table with bandwidth (bytes/s) and latency (s)")
    values[name] = Link(bandwidth=float(link["bandwidth"]), latency=float(link["latency"]))
  return Cluster(**values)


def load_cluster(spec: "str | pathlib.Path | Cluster", devices: int | None = None) -> Cluster:
  """A shipped cluster by name (``"h100-8x"``, ``jdist.analysis.plan.available_clusters()``) or a TOML file
  of the same keys; ``devices`` overrides the file's device count.

  Raises:
    OptionError: an unknown name (the names are listed), a missing file or a malformed one.
  """
  if isinstance(spec, Cluster):
    cluster = spec
  else:
    path = pathlib.Path(spec)
    if path.suffix != ".toml" and not path.exists():
      names = available_clusters()
      if str(spec) not in names:
        hint = difflib.get_close_matches(str(spec), names, n=1)
        raise OptionError("cluster", str(spec), f"a shipped cluster ({', '.join(names)}) or a TOML file",
                          f"Did you mean {hint[0]!r}?" if hint
                          else f"Add your own: copy {CLUSTER_DIR / 'h100-8x.toml'}.")
      path = CLUSTER_DIR / f"{spec}.toml"
    if not path.is_file():
      raise OptionError("cluster", str(spec), "an existing TOML file or a shipped cluster's name",
                        f"Shipped: {', '.join(available_clusters())}.")
    try:
      raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
      raise OptionError("cluster", str(path), f"valid TOML ({e})") from None
    cluster = cluster_from_dict(raw, where=str(path))
  if devices is not None:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
      raise OptionError("devices", devices, "a positive int")
    cluster = cluster.with_devices(devices)
  return cluster
