"""Plots a person can read: constant metrics are no curves, axes show plain numbers, families keep lines few."""
import json

import numpy as np
import pytest

from jdist.analysis import plot


def _run(path, losses, **constant):
  path.mkdir(parents=True)
  with open(path / "metrics.jsonl", "w") as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({"step": step, "loss": float(loss), "grad_norm": 1.0 / step, **constant}) + "\n")
  return path


def test_plot_runs_skips_metrics_that_never_change(tmp_path, monkeypatch):
  runs = [_run(tmp_path / f"r{i}", np.linspace(2, 0.1 + i, 30), bubble=0.25 * i, ticks=11) for i in range(3)]
  drawn = []
  monkeypatch.setattr(plot, "_axes_style", lambda ax, metric: drawn.append(metric))
  out = plot.plot_runs(runs, tmp_path / "p.png")
  assert out.is_file() and drawn == ["loss", "grad_norm"]  # bubble and ticks are constant within each run
  drawn.clear()
  plot.plot_runs(runs, tmp_path / "q.png", metrics=["bubble"])  # asked for by name: drawn anyway
  assert drawn == ["bubble"]


def test_axes_show_plain_numbers(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots()
  ax.plot([1, 2, 3], [1000.001, 1000.002, 1000.003])
  plot._axes_style(ax, "eval_accuracy")
  fig.canvas.draw()
  assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "+1e3" a reader has to add
  plt.close(fig)


def test_plot_families_draws_a_band_and_refuses_crowded_panels(tmp_path):
  band = [_run(tmp_path / f"exact{i}", np.linspace(2, 0.1, 20) * (1 + 1e-6 * i)) for i in range(4)]
  other = _run(tmp_path / "int8", np.linspace(2, 0.2, 20))
  out = plot.plot_families({"compressed": [("int8", other)], "async": [("s=1", other)]}, tmp_path / "f.png",
                           metrics=["loss", "grad_norm"], band=band)
  assert out.is_file() and out.stat().st_size > 10_000
  with pytest.raises(ValueError, match="At most 6"):
    plot.plot_families({"many": [(str(i), other) for i in range(7)]}, tmp_path / "g.png")
