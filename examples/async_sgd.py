"""Asynchronous SGD, emulated: the article's random pauses, then what a staleness bound does to training.

Part 1 is the article's setting: y = 2x + 1 on x = 1..8 with 4 workers (2 points each), each pausing with
probability 0.05 per tick; the server applies whatever arrives. It still finds w = 2, b = 1.

Part 2 trains the digits MLP with 8 workers of 16 examples that pause half the time, under Stale Synchronous
Parallel bounds s = 0 (BSP), 1, 2, 4, 16 and none, with both update rules:

- ``apply="mean"``: a tick's delivered gradients averaged into one update, at SGD lr 0.3 (one step of lr per
  tick, like data_parallel);
- ``apply="each"``: every gradient its own update, at lr 0.075 = 0.3 / (8 workers x 0.5 delivering): the same
  expected movement per tick.

Each configuration runs once per schedule key (the key given to ``init``; the batches and the initial
parameters stay the same). It prints, per rule and bound, the median and range over keys of the final loss (the
per-tick loss metric averaged over the last 10% of ticks), of the server's final train-set loss (the metric is
each computing worker's loss on its own, stale, copy, so the server's parameters are also measured directly, 20
times a run) and of the test accuracy; the runs that died (server train loss > 2, ln 10
being 2.30); the updates applied; the loss per update; the workers waiting at the gate; and draws the server's
loss against ticks and against updates to a PNG. ``benchmarks/async_staleness.py`` runs the same study over 10
keys and writes the table in benchmarks/RESULTS.md.

The workers run on one device here (vmapped), which is fastest on a CPU; ``--devices`` places one worker per
emulated device on a ``workers`` mesh instead (the same numbers, more slowly).

Run: python examples/async_sgd.py [--ticks 600] [--keys 3] [--out runs/async_sgd] [--devices]
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

BOUNDS = (0, 1, 2, 4, 16, None)
RULES = {"mean": 0.3, "each": 0.075}  # the SGD learning rate fitting each rule: the same expected step per tick
WORKERS, PER_WORKER, PAUSE, TARGET, DEAD = 8, 16, 0.5, 0.3, 2.0
CHUNKS = 20  # the server's parameters are measured on the train set after every 1/CHUNKS of a run's ticks


def name(bound) -> str:
  return f"s={'none' if bound is None else bound}"


def article_regression(ticks: int = 4000, *, mesh=None, verbose: bool = True) -> dict[str, float]:
  """4 workers, pause_prob 0.05, SGD lr 0.01: returns the final w, b and how often workers delivered."""
  strategy = async_sgd(linear.loss, optax.sgd(0.01), mesh, num_workers=4, pause_prob=0.05)
  one = split_workers(linear_regression(), 4)  # the same 8 points every tick, broadcast over the ticks
  batches = jax.tree.map(lambda x: np.broadcast_to(x, (ticks, *x.shape)), one)
  state, metrics = jdist.scan_steps(strategy, strategy.init(linear.init(), key=0), batches)
  w, b = float(state.params["w"][0, 0]), float(state.params["b"][0])
  result = {"w": w, "b": b, "delivered": float(np.mean(metrics["delivered"])),
            "max_staleness": int(np.max(metrics["max_staleness"]))}
  if verbose:
    print(f"article regression, 4 workers pausing 5% of ticks, {ticks} ticks: w = {w:.4f}, b = {b:.4f} "
          f"(exact: 2, 1); {result['delivered']:.1%} of worker-ticks delivered, max staleness "
          f"{result['max_staleness']} updates")
  return result


def digits_batches(ticks: int):
  """``ticks`` batches of the digits train set, leaves [ticks, workers, per worker, ...]; the train and test sets."""
  train, test = digits()
  loader = iter(ArrayLoader(train, WORKERS * PER_WORKER, seed=0))
  stacked = [split_workers(next(loader), WORKERS) for _ in range(ticks)]
  return jax.tree.map(lambda *xs: np.stack(xs), *stacked), train, test


def one_run(strategy, params, key: int, batches, train, test) -> dict:
  """One run, scanned in CHUNKS pieces; after each, the server's parameters are measured on the whole train set
  (the per-tick ``loss`` metric is each computing worker's loss on its own copy, stale by the time its gradient
  lands: the model itself is the server's parameters)."""
  loss_fn, accuracy = jax.jit(mlp.loss), jax.jit(mlp.accuracy)
  size = jax.tree.leaves(batches)[0].shape[0] // CHUNKS
  state = strategy.init(params, key=key)
  chunks, curve, versions = [], [], []
  for c in range(CHUNKS):
    state, m = jdist.scan_steps(strategy, state, jax.tree.map(lambda x: x[c * size:(c + 1) * size], batches))
    chunks.append(jax.device_get(m))
    curve.append(float(loss_fn(state.params, train)))
    versions.append(int(state.extra["version"]))
  m = {k: np.concatenate([c[k] for c in chunks]) for k in ("loss", "num_delivered", "num_waiting")}
  hit = np.flatnonzero(np.array(curve) < TARGET)
  return {"final_loss": float(np.mean(m["loss"][-max(1, len(m["loss"]) // 10):])), "first_loss": float(m["loss"][0]),
          "train_loss": curve[-1], "accuracy": float(accuracy(state.params, test)), "dead": not curve[-1] < DEAD,
          "updates": versions[-1], "gradients": int(m["num_delivered"].sum()),
          "waiting": float(m["num_waiting"].mean()), "curve": np.array(curve), "versions": np.array(versions),
          "ticks_to_target": (int(hit[0]) + 1) * size if len(hit) else None}


def staleness_runs(bounds=BOUNDS, rules=RULES, keys=(0, 1, 2), ticks: int = 600, *, mesh=None) -> dict:
  """One run per (rule, bound, key). Returns ``{(rule, bound): {metric: [one value per key]}}``, with
  ``loss_at_updates``: the server's train loss when the run had applied as many updates as the fewest of its rule
  (``at_updates``), interpolated between the measurements."""
  batches, train, test = digits_batches(ticks - ticks % CHUNKS)
  params = mlp.init(jax.random.key(0), [64, 64, 10])
  out = {}
  for rule in rules:
    for bound in bounds:
      strategy = async_sgd(mlp.loss, optax.sgd(RULES[rule]), mesh, num_workers=WORKERS, max_staleness=bound,
                           pause_prob=PAUSE, apply=rule)
      runs = out[(rule, bound)] = {"lr": RULES[rule], "ticks_per_point": ticks // CHUNKS}
      for key in keys:
        for k, v in one_run(strategy, params, key, batches, train, test).items():
          runs.setdefault(k, []).append(v)
    reached = min(min(r["updates"]) for (ru, _), r in out.items() if ru == rule)
    for (ru, _), r in out.items():
      if ru == rule:
        r["at_updates"] = reached
        r["loss_at_updates"] = [float(np.interp(reached, v, c)) for c, v in zip(r["curve"], r["versions"])]
  return out


def summary(runs: dict) -> dict:
  """Median and range over keys of each metric, and the count of dead runs."""
  stats = lambda xs: {"median": float(np.median(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}
  hits = [t for t in runs["ticks_to_target"] if t is not None]
  return {"lr": runs["lr"], "keys": len(runs["final_loss"]), "dead": int(sum(runs["dead"])),
          **{k: stats(runs[k]) for k in ("final_loss", "train_loss", "accuracy", "updates", "gradients", "waiting",
                                         "loss_at_updates")},
          "at_updates": runs["at_updates"],
          "ticks_to_target": float(np.median(hits)) if len(hits) == len(runs["ticks_to_target"]) else None}


def table(results: dict) -> list[tuple]:
  """One row per (rule, bound): the summary's numbers as strings (median [min, max])."""
  rows = []
  for (rule, bound), runs in results.items():
    s = summary(runs)
    rng = lambda k, f: f"{s[k]['median']:{f}} [{s[k]['min']:{f}}, {s[k]['max']:{f}}]"
    t = s["ticks_to_target"]
    rows.append((f"{rule}, {s['lr']:g}", name(bound), rng("final_loss", ".3f"), rng("train_loss", ".3f"),
                 rng("accuracy", ".3f"), f"{s['dead']}/{s['keys']}", f"{s['updates']['median']:.0f}",
                 f"{s['loss_at_updates']['median']:.3f} @ {s['at_updates']}", f"{s['waiting']['median']:.2f}",
                 "-" if t is None else f"{t:.0f}"))
  return rows


HEADER = ("rule, lr", "bound", "final loss (last 10%)", "server train loss", "test accuracy", "dead", "updates",
          "train loss @ updates", "waiting", f"ticks to {TARGET}")


def print_table(results: dict, ticks: int) -> None:
  print(f"\ndigits MLP, {WORKERS} workers x {PER_WORKER} examples, each pausing {PAUSE:.0%} of ticks, {ticks} ticks; "
        f"median [min, max] over schedule keys")
  widths = [max(len(str(r[i])) for r in [HEADER, *table(results)]) + 2 for i in range(len(HEADER))]
  for row in [HEADER, *table(results)]:
    print("".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def plot(results: dict, path: pathlib.Path) -> pathlib.Path:
  """Median (line) and range (band) over keys of the server's train loss, against ticks and against updates."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rules = sorted({rule for rule, _ in results}, key=list(RULES).index)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(len(rules), 2, figsize=(12, 4 * len(rules)), squeeze=False, sharey=True)
  for row, rule in zip(axes, rules):
    for (ru, bound), runs in results.items():
      if ru != rule:
        continue
      curves = np.array(runs["curve"])
      ticks = np.arange(1, curves.shape[1] + 1) * runs["ticks_per_point"]
      line, = row[0].plot(ticks, np.median(curves, 0), label=name(bound), marker=".")
      row[0].fill_between(ticks, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
      row[1].plot(np.median(np.array(runs["versions"]), 0), np.median(curves, 0), label=name(bound), marker=".")
    for ax, x in zip(row, ("server tick", "server updates applied (median over keys)")):
      ax.set_yscale("log")
      ax.set_xlabel(x)
      ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
      ax.set_title(f'apply="{rule}", SGD lr {RULES[rule]:g}')
      ax.legend(title="max_staleness", fontsize=8)
    row[0].set_ylabel("train-set loss of the server's parameters")
  fig.suptitle(f"async SGD on digits: {WORKERS} workers pausing {PAUSE:.0%} of ticks; median and range over "
               f"{len(next(iter(results.values()))['curve'])} schedule keys")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_path(out: str) -> pathlib.Path:
  """``--out`` as named: a ``.png`` file itself, or a directory that gets ``async_sgd.png``."""
  path = pathlib.Path(out)
  return path if path.suffix.lower() == ".png" else path / "async_sgd.png"


def run(ticks: int = 600, out: str = "runs/async_sgd", verbose: bool = True, *, bounds=BOUNDS, keys=(0, 1, 2),
        rules=tuple(RULES), devices: bool = False, linear_ticks: int = 4000) -> dict:
  """Both parts. Returns ``{"linear_regression": {...}, "digits": {(rule, bound): {metric: [per key]}}}``."""
  mesh = jdist.make_mesh(workers=WORKERS) if devices else None
  four = jdist.make_mesh(workers=4, devices=jax.devices()[:4]) if devices else None
  results = {"linear_regression": article_regression(linear_ticks, mesh=four, verbose=verbose),
             "digits": staleness_runs(bounds, rules, keys, ticks, mesh=mesh)}
  if verbose:
    print_table(results["digits"], ticks)
    print(f"final loss: the per-tick loss metric (each computing worker on its own copy), last 10% of ticks; "
          f"server train loss: the final parameters on the whole train set; dead: server train loss > {DEAD} (ln 10 "
          f"= 2.30); train loss @ updates: the server's when the run had applied as many updates as the fewest of its "
          f"rule; waiting: workers held at the gate per tick. s counts clocks (gradients delivered); a bound of s "
          f"allows up to ({WORKERS} - 1)(2s + 1) updates of staleness.")
    print(f"loss curves: {plot(results['digits'], plot_path(out))}")
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ticks", type=int, default=600, help="server ticks per run (default 600)")
  parser.add_argument("--keys", type=int, default=3, help="schedule keys per configuration")
  parser.add_argument("--out", default="runs/async_sgd",
                      help="the plot: a .png file, or a directory that gets async_sgd.png (default runs/async_sgd)")
  parser.add_argument("--devices", action="store_true", help="one worker per emulated device")
  args = parser.parse_args()
  run(args.ticks, args.out, keys=tuple(range(args.keys)), devices=args.devices)
