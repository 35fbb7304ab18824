"""Asynchronous SGD, emulated: the article's random pauses, then what staleness does to convergence.

Part 1 is the article's setting: y = 2x + 1 on x = 1..8 with 4 workers (2 points each), each pausing
with probability 0.05 per tick; the server applies whatever arrives. It still finds w = 2, b = 1.

Part 2 trains the digits MLP with 8 workers that pause half the time (so gradients arrive stale),
under staleness bounds s = 0 (synchronous), 1, 4, 16 and none, each with and without
``staleness_lr="inverse"``. Every configuration sees the same batches and the same pause draws (one
key). It prints a table of the ticks each needs to bring the loss (a 20-tick moving average) under a
target and draws the loss curves to a PNG. One tick is one server tick, and an asynchronous tick
applies each delivered gradient at the full learning rate: up to 8 updates where a synchronous round
makes one averaged update. With no bound or a loose one (s = 16) the workers deliver at scattered
times and lr 0.3 trains well, faster per tick than s = 0. A tight bound (s = 1, 4) keeps the workers
nearly in step: at each release the waiting workers deliver together gradients taken at the same
parameters, an effective step of up to 8 x 0.3 that drives the MLP into a dead state (loss ~ ln 10;
s = 1 collapsed for all 10 pause seeds tried, no bound for none). ``staleness_lr="inverse"`` divides the
burst's later updates by their staleness within the tick, which is why it rescues s = 1 and 4. Mean
staleness is about the same in all these runs, so it does not predict which fail. (Checked against
a plain-Python parameter server on the same pause draws: the same deliveries and staleness at every
tick, losses equal to 1e-9 in float64.)

The workers run on one device here (vmapped), which is fastest on a CPU; ``--devices`` places one
worker per emulated device on a ``workers`` mesh instead (the same numbers, more slowly).

Run: python examples/async_sgd.py [--ticks 600] [--out runs/async_sgd] [--devices]
"""
from __future__ import annotations

import argparse
import pathlib

import jdist

jdist.emulate_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jdist.data import ArrayLoader  # noqa: E402
from jdist.datasets import digits, linear_regression  # noqa: E402
from jdist.models import linear, mlp  # noqa: E402
from jdist.strategies.async_sgd import async_sgd, split_workers  # noqa: E402

BOUNDS = (0, 1, 4, 16, None)
LRS = (None, "inverse")
WORKERS, PER_WORKER, LR, PAUSE, TARGET, SMOOTH = 8, 16, 0.3, 0.5, 0.3, 20


def label(bound, lr) -> str:
  return f"s={'none' if bound is None else bound}" + (f", lr={lr}" if lr else "")


def article_regression(ticks: int = 4000, *, mesh=None, verbose: bool = True) -> dict[str, float]:
  """4 workers, pause_prob 0.05, SGD lr 0.01: returns the final w, b and how often workers paused."""
  strategy = async_sgd(linear.loss, optax.sgd(0.01), num_workers=4, pause_prob=0.05, mesh=mesh, key=0)
  batches = jax.tree.map(lambda x: x[None], split_workers(linear_regression(), 4))  # the same 8 points every tick
  state, metrics = strategy.run(strategy.init(linear.init()), batches, ticks)
  w, b = float(state.params["w"][0, 0]), float(state.params["b"][0])
  result = {"w": w, "b": b, "delivered": float(np.mean(metrics["delivered"])),
            "max_staleness": int(np.max(metrics["max_staleness"])), "loss": float(metrics["loss"][-1])}
  if verbose:
    print(f"article regression, 4 workers pausing 5% of ticks, {ticks} ticks: w = {w:.4f}, b = {b:.4f} "
          f"(exact: 2, 1); {result['delivered']:.1%} of worker-ticks delivered, max staleness "
          f"{result['max_staleness']} updates")
  return result


def smooth(x: np.ndarray) -> np.ndarray:
  """Moving average over the last SMOOTH ticks (shorter at the start)."""
  c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0))
  lo = np.maximum(np.arange(1, len(x) + 1) - SMOOTH, 0)
  return (c[1:] - c[lo]) / (np.arange(1, len(x) + 1) - lo)


def run(ticks: int = 600, out: str = "runs/async_sgd", verbose: bool = True, *, bounds=BOUNDS, lrs=LRS,
        devices: bool = False, linear_ticks: int = 4000) -> dict:
  """Both parts. Returns ``{"linear_regression": {...}, "digits": {label: {...}}}``."""
  mesh = jdist.make_mesh(workers=WORKERS) if devices else None
  results = {"linear_regression": article_regression(linear_ticks, mesh=jdist.make_mesh(
      workers=4, devices=jax.devices()[:4]) if devices else None, verbose=verbose), "digits": {}}
  train, test = digits()
  loader = iter(ArrayLoader(train, WORKERS * PER_WORKER, seed=0))
  stacked = [split_workers(next(loader), WORKERS) for _ in range(ticks)]
  batches = jax.tree.map(lambda *xs: np.stack(xs), *stacked)  # [ticks, workers, per worker, ...]
  params = mlp.init(jax.random.key(0), [64, 64, 10])
  curves = {}
  for bound in bounds:
    for lr in lrs:
      strategy = async_sgd(mlp.loss, optax.sgd(LR), num_workers=WORKERS, mesh=mesh, max_staleness=bound,
                           pause_prob=PAUSE, staleness_lr=lr, key=0)
      state, m = strategy.run(strategy.init(params), batches, ticks)
      loss = smooth(np.asarray(m["loss"]))
      hit = np.flatnonzero(loss < TARGET)
      curves[label(bound, lr)] = loss
      results["digits"][label(bound, lr)] = {
          "ticks_to_target": int(hit[0]) + 1 if len(hit) else None,
          "first_loss": float(loss[0]), "final_loss": float(loss[-1]),
          "accuracy": float(jax.jit(mlp.accuracy)(state.params, test)),
          "updates": int(state.extra["version"]),
          "mean_staleness": float(np.sum(np.asarray(m["mean_staleness"]) * np.asarray(m["num_delivered"]))
                                  / max(1, int(np.sum(m["num_delivered"])))),
          "max_staleness": int(np.max(m["max_staleness"])),
      }
  if verbose:
    print(f"\ndigits MLP, {WORKERS} workers x {PER_WORKER} examples, each pausing {PAUSE:.0%} of ticks, SGD lr {LR}, "
          f"{ticks} ticks")
    print(f"{'configuration':<22}{f'ticks to loss<{TARGET}':>20}{'final loss':>12}{'test acc':>10}{'updates':>9}"
          f"{'mean stale':>12}{'max stale':>11}")
    for name, r in results["digits"].items():
      hit = "never" if r["ticks_to_target"] is None else str(r["ticks_to_target"])
      print(f"{name:<22}{hit:>20}{r['final_loss']:>12.4f}{r['accuracy']:>10.2%}{r['updates']:>9}"
            f"{r['mean_staleness']:>12.2f}{r['max_staleness']:>11}")
    print(f"stale: server updates made since the worker pulled its parameters. s is in clocks (how far a worker may "
          f"run ahead of the slowest), so a bound of s allows up to ({WORKERS} - 1)(2s + 1) updates.")
    print(f"loss curves: {plot(curves, pathlib.Path(out) / 'async_sgd.png', lrs)}")
  return results


def plot(curves: dict[str, np.ndarray], path: pathlib.Path, lrs) -> pathlib.Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path.parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4), squeeze=False, sharey=True)
  for ax, lr in zip(axes[0], lrs):
    for name, loss in curves.items():
      if ("lr=" in name) == bool(lr):
        ax.plot(np.arange(1, len(loss) + 1), loss, label=name.split(",")[0])
    ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("server tick")
    ax.set_title(f"staleness_lr={lr!r}")
    ax.legend(title="max_staleness")
  axes[0][0].set_ylabel(f"train loss ({SMOOTH}-tick mean)")
  fig.suptitle(f"async SGD on digits: {WORKERS} workers pausing {PAUSE:.0%} of ticks")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ticks", type=int, default=600)
  parser.add_argument("--out", default="runs/async_sgd")
  parser.add_argument("--devices", action="store_true", help="one worker per emulated device")
  args = parser.parse_args()
  run(args.ticks, args.out, devices=args.devices)
