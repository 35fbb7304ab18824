"""Loss curves (and any other logged metric) of one or more run directories, as a PNG."""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

from jdist.train._writers import METRICS_FILE, read_jsonl

_STYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def plot_runs(run_dirs: Sequence[str | pathlib.Path], out: str | pathlib.Path, *,
              metrics: Sequence[str] | None = None, labels: Sequence[str] | None = None,
              title: str | None = None) -> pathlib.Path:
  """Draws each metric of ``metrics.jsonl`` against step, one panel per metric, one line per run.

  Args:
    run_dirs: directories written by ``jdist.fit`` (each holds ``metrics.jsonl``).
    out: the PNG path to write.
    metrics: which metrics to draw; by default every numeric one found (loss first).
    labels: legend labels, by default the directory names.

  Returns:
    The path of the PNG.

  Raises:
    FileNotFoundError: a run directory has no ``metrics.jsonl``.
    ValueError: a damaged ``metrics.jsonl``, labels not one per run, an empty or unknown ``metrics``.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if isinstance(run_dirs, (str, pathlib.Path)):  # one directory, not the characters of its name
    run_dirs = [run_dirs]
  runs = [_read(d) for d in run_dirs]
  labels = list(labels) if labels is not None else [pathlib.Path(d).name for d in run_dirs]
  if len(labels) != len(runs):
    raise ValueError(f"Got {len(labels)} labels for {len(runs)} run directories; pass one label per run.")
  if metrics is not None and not list(metrics):
    raise ValueError("metrics is empty; pass the names of metrics to draw, or None for all of them.")
  found: list[str] = []
  for records in runs:
    for r in records:
      for k, v in r.items():
        if k != "step" and isinstance(v, (int, float)) and k not in found:
          found.append(k)
  found.sort(key=lambda k: (k != "loss", k.startswith("eval_"), k))
  if not found:
    raise ValueError(f"No numeric metrics found in {list(map(str, run_dirs))}.")
  if metrics is None:  # a metric that never changes within a run (a pipeline's bubble, ticks) is no curve
    metrics = [k for k in found if not _constant(runs, k)] or found
  missing = [m for m in metrics if m not in found]
  if missing:
    raise ValueError(f"No run logged {missing}; the metrics in {list(map(str, run_dirs))} are {found}.")
  cols = min(3, len(metrics))
  rows = (len(metrics) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for i, (label, records) in enumerate(zip(labels, runs)):
      pts = _points(records, metric)
      if pts:  # varied dashes keep runs that coincide (as equivalent strategies do) visible
        # the default cycle has 10 colours; tab20 then tab20b give 40 distinct ones
        color = (plt.cm.tab20 if i < 20 else plt.cm.tab20b)(i % 20) if len(runs) > 10 else None
        ax.plot(*zip(*pts), label=label, linestyle=_STYLES[i % len(_STYLES)], linewidth=2.2 - 0.3 * (i % 4),
                marker="." if len(pts) < 30 else None, color=color)
    _axes_style(ax, metric)
    if len(runs) <= 4:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(metrics):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if len(runs) > 4:  # one legend beside the panels instead of one over each, with every run any panel drew
    legend = {}
    for ax in axes.flat:
      for handle, name in zip(*ax.get_legend_handles_labels()):
        legend.setdefault(name, handle)
    ordered = [name for name in labels if name in legend]
    fig.legend([legend[n] for n in ordered], ordered, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
  return _save(fig, out)


def plot_families(families: Mapping[str, Sequence[tuple[str, str | pathlib.Path]]], out: str | pathlib.Path, *,
                  metrics: Sequence[str] = ("loss",),
                  band: Sequence[str | pathlib.Path] | Mapping[str, Sequence[str | pathlib.Path]] = (),
                  band_label: str = "= 1 device", title: str | None = None) -> pathlib.Path:
  """One column of panels per family of runs, one row per metric, so each panel has a few lines to tell apart.

  Args:
    families: family name -> ``(label, run_dir)`` pairs, at most 6 per family (more are not distinguishable).
    out: the PNG path to write.
    metrics: the metrics to draw, one row of panels each.
    band: run directories that compute the same mathematics (they agree to rounding): drawn in every panel
      as one grey band from their lowest to their highest value at each step, the reference to compare with;
      or a mapping from family name to its own band (a family of another model).
    band_label: the band's legend entry.

  Returns:
    The path of the PNG.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  crowded = {name: len(runs) for name, runs in families.items() if len(runs) > 6}
  if crowded:
    raise ValueError(f"At most 6 runs per family can be told apart, got {crowded}; split the family.")
  bands = {name: [_read(d) for d in (band.get(name, ()) if isinstance(band, Mapping) else band)]
           for name in families}
  fig, axes = plt.subplots(len(metrics), len(families), figsize=(4.2 * len(families), 3.3 * len(metrics)),
                           squeeze=False, sharex=True)
  for col, (name, runs) in enumerate(families.items()):
    for row, metric in enumerate(metrics):
      ax = axes[row, col]
      _draw_band(ax, bands[name], metric, band_label)
      for i, (label, run_dir) in enumerate(runs):
        pts = _points(_read(run_dir), metric)
        if pts:
          ax.plot(*zip(*pts), label=label, color=plt.cm.tab10(i), linestyle=_STYLES[i % len(_STYLES)], linewidth=1.6)
      _axes_style(ax, metric)
      if row == 0:
        ax.set_title(name)
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, out)


def _read(run_dir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(run_dir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{run_dir} has no {METRICS_FILE}; pass run directories written by jdist train / "
                            "jdist.fit.")
  return read_jsonl(path)


def _points(records: list[dict], metric: str) -> list[tuple[int, float]]:
  return [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]


def _constant(runs: list[list[dict]], metric: str) -> bool:
  """True when ``metric`` takes one value throughout each run."""
  return all(len({v for _, v in _points(records, metric)}) <= 1 for records in runs)


def _draw_band(ax, runs: list[list[dict]], metric: str, label: str) -> None:
  by_step: dict[int, list[float]] = {}
  for records in runs:
    for step, value in _points(records, metric):
      by_step.setdefault(step, []).append(value)
  if by_step:
    steps = sorted(by_step)
    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps], color="0.6",
                    alpha=0.45, linewidth=4, edgecolor="0.7", label=f"{label} ({len(runs)} runs)")


def _axes_style(ax, metric: str) -> None:
  """Step on x; losses and gradient norms on a log scale; plain numbers on the axes (no offset, no 1e-3
  multipliers a reader has to apply)."""
  from matplotlib.ticker import FuncFormatter

  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  if metric.endswith("loss") or metric == "grad_norm":
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if _few_decades(ax) else FuncFormatter(lambda v, _: ""))
  else:
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
  ax.ticklabel_format(axis="x", useOffset=False, style="plain")
  ax.grid(alpha=0.3)


def _few_decades(ax) -> bool:
  import math

  low, high = ax.get_ylim()
  return low > 0 and math.log10(high / low) < 1.2


def _save(fig, out: str | pathlib.Path) -> pathlib.Path:
  import matplotlib.pyplot as plt

  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return out
