"""Loss curves (and any other logged metric) of one or more run directories, as a PNG."""
from __future__ import annotations

import pathlib
from typing import Sequence

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
  runs = []
  for d in run_dirs:
    path = pathlib.Path(d) / METRICS_FILE
    if not path.is_file():
      raise FileNotFoundError(f"{d} has no {METRICS_FILE}; pass run directories written by jdist train / jdist.fit.")
    runs.append(read_jsonl(path))
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
  if metrics is None:
    metrics = found
  missing = [m for m in metrics if m not in found]
  if missing:
    raise ValueError(f"No run logged {missing}; the metrics in {list(map(str, run_dirs))} are {found}.")
  cols = min(3, len(metrics))
  rows = (len(metrics) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
  for ax, metric in zip(axes.flat, metrics):
    for i, (label, records) in enumerate(zip(labels, runs)):
      pts = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
      if pts:  # varied dashes keep runs that coincide (as equivalent strategies do) visible
        # the default cycle has 10 colours; tab20 then tab20b give 40 distinct ones
        color = (plt.cm.tab20 if i < 20 else plt.cm.tab20b)(i % 20) if len(runs) > 10 else None
        ax.plot(*zip(*pts), label=label, linestyle=_STYLES[i % len(_STYLES)], linewidth=2.2 - 0.3 * (i % 4),
                marker="." if len(pts) < 30 else None, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if metric.endswith("loss") or metric == "grad_norm":
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
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
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return out
