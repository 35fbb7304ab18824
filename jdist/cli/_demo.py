"""``jdist demo``: the digits MLP trained with every strategy, compared in one table and one plot."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import time
from typing import Any

DEFAULT_STEPS = 400
QUICK_STEPS = 150


@dataclasses.dataclass(frozen=True)
class DemoEntry:
  """One row of the demo: a strategy name from ``jdist.experiment.STRATEGIES`` and its settings."""

  label: str
  strategy: str
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  axes: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
  num_devices: int = 0  # 0: all devices
  model: str = "mlp"  # "mlp" (64-128-10) or "resmlp" (64-128, 8 residual layers of 128, 10)
  exact: bool = True  # computes single-device training's mathematics (else trades it for less communication)


ENTRIES: list[DemoEntry] = [
    DemoEntry("single device", "data_parallel", axes={"data": 1}, num_devices=1),
    DemoEntry("sync data parallel", "data_parallel"),
    DemoEntry("sync data parallel (pmap)", "data_parallel", {"backend": "pmap"}),
    DemoEntry("sync DP, 4 micro-batches", "data_parallel", {"accumulate_steps": 4}),
    DemoEntry("sync DP, ring all-reduce", "data_parallel", {"reducer": {"algorithm": "ring"}}),
    DemoEntry("sync DP, halving-doubling", "data_parallel", {"reducer": {"algorithm": "halving_doubling"}}),
    DemoEntry("sync DP, tree all-reduce", "data_parallel", {"reducer": {"algorithm": "tree"}}),
    DemoEntry("sync DP, hierarchical 2x4", "data_parallel",
              {"reducer": {"algorithm": "hierarchical"}, "axis": ("node", "device")}, axes={"node": 2, "device": 4},
              num_devices=8),
    DemoEntry("sync DP, int8 + error feedback", "data_parallel", {"reducer": "int8"}, exact=False),
    DemoEntry("sync DP, PowerSGD rank 4", "data_parallel", {"reducer": {"name": "powersgd", "rank": 4}}, exact=False),
    DemoEntry("tensor parallel (model=8)", "sharded", {"rules": "tp"}, axes={"model": 8}, num_devices=8),
    DemoEntry("DP x TP (data=2, model=4)", "sharded", {"rules": "tp"}, axes={"data": 2, "model": 4}, num_devices=8),
    DemoEntry("FSDP / ZeRO-3 (GSPMD)", "sharded", {"fsdp_axis": "fsdp"}, axes={"fsdp": -1}),
    DemoEntry("FSDP / ZeRO-3 (shard_map)", "fsdp", {}, axes={"fsdp": -1}),
    DemoEntry("async SGD, 8 workers, no pauses", "async_sgd", {"num_workers": 8}),
    DemoEntry("async SGD, pause 0.5, staleness <= 2", "async_sgd",
              {"num_workers": 8, "pause_prob": 0.5, "max_staleness": 2}, exact=False),
    DemoEntry("async SGD, pause 0.5, unbounded", "async_sgd", {"num_workers": 8, "pause_prob": 0.5}, exact=False),
    DemoEntry("res-MLP, single device", "data_parallel", axes={"data": 1}, num_devices=1, model="resmlp"),
    DemoEntry("res-MLP, pipeline p=8, m=8 (GPipe)", "pipeline", {"microbatches": 8}, axes={"pipe": 8},
              num_devices=8, model="resmlp"),
    DemoEntry("res-MLP, pipeline p=8, m=8 (1F1B)", "pipeline", {"microbatches": 8, "schedule": "1f1b"},
              axes={"pipe": 8}, num_devices=8, model="resmlp"),
    DemoEntry("res-MLP, data=2 x pipe=4, circular", "pipeline",
              {"microbatches": 4, "schedule": "circular", "repeats": 2, "data_axis": "data"},
              axes={"data": 2, "pipe": 4}, num_devices=8, model="resmlp"),
    DemoEntry("local SGD, H=4", "local_sgd", {"sync_every": 4}, exact=False),
    DemoEntry("local SGD, H=16", "local_sgd", {"sync_every": 16}, exact=False),
    DemoEntry("DiLoCo, H=16", "local_sgd", {"sync_every": 16, "outer_lr": 0.7, "outer_momentum": 0.9,
                                            "outer_nesterov": True}, exact=False),
]


class _Clock:
  """Records the wall time of every step after the first (which includes compilation)."""

  def __init__(self):
    self.times: list[float] = []

  def on_step(self, loop, step, metrics):
    self.times.append(time.perf_counter())

  def steps_per_s(self) -> float:
    if len(self.times) < 3:
      return float("nan")
    return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _slug(label: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def demo(*, quick: bool = False, steps: int | None = None, out: str = "runs/demo") -> int:
  import jax
  from rich.console import Console
  from rich.table import Table

  from jdist.analysis import comm_report
  from jdist.analysis.plot import plot_families
  from jdist.config import (
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    StrategyConfig,
    TrainConfig,
  )
  from jdist.experiment import build
  from jdist.train import NanGuard, ProgressBar, fit

  if steps is not None and (not isinstance(steps, int) or steps < 1):
    raise ValueError(f"--steps must be a positive int (steps per strategy), got {steps!r}.")
  steps = steps or (QUICK_STEPS if quick else DEFAULT_STEPS)
  console = Console(width=None if Console().is_terminal else 170)
  devices = jax.devices()
  # a power of two up to 8, the layout the rows are drawn for (8 async workers, pipelines of 8 stages)
  used = min(1 << (len(devices).bit_length() - 1), 8)
  console.print(f"[bold]jdist demo[/bold]: an MLP (64-128-10; the pipeline rows: a residual MLP with 8 layers of 128) "
                f"on scikit-learn's 8x8 digits, {steps} Adam steps, global batch 128, on {used} "
                f"{devices[0].platform} device(s)" + (f" of {len(devices)}." if used != len(devices) else "."))
  out_dir = pathlib.Path(out)
  rows, run_dirs, ran = [], [], []
  for entry in ENTRIES:
    if entry.num_devices > 1 and entry.num_devices != used:
      continue  # layouts drawn for 8 devices
    hidden = (128,) * 8 if entry.model == "resmlp" else (128,)
    config = Config(run_dir=str(out_dir / _slug(entry.label)), data=DataConfig(batch_size=128),
                    model=ModelConfig(name=entry.model, kwargs={"hidden": list(hidden)}),
                    strategy=StrategyConfig(name=entry.strategy, options=entry.options),
                    mesh=MeshConfig(axes=entry.axes, num_devices=entry.num_devices or used),
                    train=TrainConfig(steps=steps, log_every=max(1, steps // 100), eval_every=max(10, steps // 8)))
    exp = build(config)
    for stale in ("metrics.jsonl", "timing.jsonl"):
      (pathlib.Path(config.run_dir) / stale).unlink(missing_ok=True)
    clock = _Clock()
    result = fit(exp.strategy, exp.state, exp.loader, steps=steps,
                 callbacks=[NanGuard(), clock, ProgressBar(f"{entry.label:<28}")],
                 eval_fn=exp.eval_fn, eval_data=exp.eval_data, eval_every=config.train.eval_every,
                 log_every=config.train.log_every, run_dir=config.run_dir, tensorboard=False)
    batch = exp.strategy.shard_batch(next(iter(exp.loader)))
    lowered = getattr(exp.strategy.step, "lower", None)
    sent = comm_report(lowered(result.state, batch)).total_sent_bytes if lowered else float("nan")
    sent /= exp.strategy.info.get("sync_every", 1)  # collectives that run every H-th step, amortised
    # SSP bounds staleness in clocks (gradients delivered), the unit max_staleness= speaks
    stale = [m.get("max_clock_staleness", m.get("max_staleness", 0.0)) for m in result.history]
    final = result.eval_history[-1]
    train_loss = result.history[-1]["loss"]
    if entry.strategy == "async_sgd" and not entry.exact:  # with pauses a tick's loss depends on who delivered
      tail = [m["loss"] for m in result.history[-max(1, len(result.history) // 10):]]
      train_loss = sum(tail) / len(tail)
    rows.append((entry.label, str(exp.strategy.mesh.size), f"{clock.steps_per_s():.1f}",
                 f"{train_loss:.4f}", f"{final['eval_loss']:.4f}", f"{final['eval_accuracy']:.2%}",
                 f"{sent / 1e3:,.1f}", f"{max(stale):.0f}", "yes" if entry.exact else "no"))
    run_dirs.append(config.run_dir)
    ran.append(entry)

  table = Table(title=f"digits, the MLP (rows marked res-MLP: 8 residual layers), {steps} steps, global batch 128")
  for col in ("strategy", "devices", "steps/s", "train loss", "test loss", "test acc", "KB sent/dev/step",
              "staleness (clocks)", "= 1 device"):
    table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
  for row in rows:
    table.add_row(*row)
  console.print(table)
  families, band = _families(ran, run_dirs)
  png = plot_families(families, out_dir / "loss_curves.png", metrics=["loss", "eval_accuracy"], band=band,
                      title=f"jdist demo: digits MLP and res-MLP on {used} {devices[0].platform} devices")
  console.print(f"Loss curves: {png}   (per-run logs under {out_dir}/; plot any of them with `jdist plot`)")
  console.print("Rows marked '= 1 device' compute single-device training's mathematics, so their losses agree up "
                "to float rounding; the others trade it for less communication (KB sent per device per step).")
  console.print("The train loss of the async SGD rows with pauses is the mean over their last 10% of ticks (a tick's "
                "reading depends on which workers delivered); strategy.seed draws another pause schedule, same params.")
  return 0


def _families(entries: list[DemoEntry], run_dirs: list[str]) -> tuple[dict, dict]:
  """The demo's runs as panels a person can read: the rows that compute one device's mathematics agree to
  rounding, so they are one grey band (per model) behind every panel; each other family is a few lines."""
  family = lambda e: ("pipeline (res-MLP)" if e.model == "resmlp" else "exact strategies" if e.exact else
                      {"async_sgd": "async SGD", "local_sgd": "local SGD / DiLoCo"}.get(e.strategy, "compressed"))
  families: dict[str, list] = {}
  band: dict[str, list] = {}
  for entry, run_dir in zip(entries, run_dirs):
    name = family(entry)
    families.setdefault(name, [])
    if entry.exact:
      band.setdefault(entry.model, []).append(run_dir)
    if not entry.exact or entry.label.endswith("single device"):
      families[name].append((entry.label, run_dir))
  return families, {name: band.get("resmlp" if name.startswith("pipeline") else "mlp", []) for name in families}
