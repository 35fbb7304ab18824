"""A float64 numpy parameter server for y = x w + b under SSP, written from the rules alone (no jdist code).

It replays which workers deliver at each tick (given, or drawn by fixed speeds it simulates itself) and applies
them by the rule asked for; the SSP gate, the pulls, staleness, DC-ASGD and the staleness-aware step are its own.
"""
from __future__ import annotations

import numpy as np


def _grad(x, y, p):
  """Gradient of the mean squared error of y = x w + b at p = (w, b), float64."""
  err = x * p[0] + p[1] - y
  return np.array([2 * np.mean(err * x), 2 * np.mean(err)])


def numpy_server(batches, *, lr, apply, s=None, momentum=0.0, lam=0.0, inverse=False, delivered=None, periods=None,
                 fail=None):
  """Runs the server tick by tick.

  Args:
    batches: {"x", "y"} with leaves [T, N, b, 1].
    apply: "mean" (a tick's gradients averaged into one SGD-with-momentum update) or "each" (one update each,
      in worker order).
    s: the SSP bound in clocks (None: none).
    delivered: bool[T, N], the workers whose gradient reaches the server at each tick (checked: a worker
      that waits or is dead must not deliver). Or ``periods``: worker w finishes after periods[w] ticks of
      computing (the server simulates it).
    fail: {worker: tick} from which the worker is dead.

  Returns:
    A dict of per-tick arrays: params [T, 2] (w, b after the tick), staleness [T, N] (-1: none), delivered,
    pulled, waiting [T, N], loss [T] (the mean over the workers computing the tick of each one's loss on its copy).
  """
  x, y = np.asarray(batches["x"], np.float64)[..., 0], np.asarray(batches["y"], np.float64)[..., 0]
  ticks, n = x.shape[:2]
  dead_at = np.full(n, np.iinfo(np.int64).max)
  for w, t in (fail or {}).items():
    dead_at[w] = t
  server, trace = np.zeros(2), np.zeros(2)
  copies = np.zeros((n, 2))
  pulled_version, clock, version = np.zeros(n, int), np.zeros(n, int), 0
  waiting, spent = np.zeros(n, bool), np.zeros(n, int)
  out = {k: [] for k in ("params", "staleness", "delivered", "pulled", "waiting", "loss")}

  def step(g, scale):
    nonlocal trace, server, version
    trace = g + momentum * trace
    server = server - lr * scale * trace
    version += 1

  for t in range(ticks):
    alive = t < dead_at
    computing = alive & ~waiting
    if periods is not None:
      spent += computing
      d = computing & (spent >= np.asarray(periods))
      spent[d] = 0
    else:
      d = np.asarray(delivered[t], bool)
      assert not (d & ~computing).any(), f"tick {t}: a waiting or dead worker delivered: {d} vs {computing}"
    grads = {w: _grad(x[t, w], y[t, w], copies[w]) for w in np.flatnonzero(d)}
    # the loss metric: the workers that compute this tick, each on its own copy
    loss = np.mean([np.mean((x[t, w] * copies[w, 0] + copies[w, 1] - y[t, w]) ** 2) for w in np.flatnonzero(computing)])
    tau = np.where(d, version - pulled_version, -1)
    if apply == "mean" and d.any():
      g = np.mean([grads[w] + lam * grads[w] ** 2 * (server - copies[w]) for w in grads], 0)
      step(g, 1 / max(1, np.mean(tau[d])) if inverse else 1)
    elif apply == "each":
      for w in grads:
        tau[w] = version - pulled_version[w]
        step(grads[w] + lam * grads[w] ** 2 * (server - copies[w]), 1 / max(1, tau[w]) if inverse else 1)
    clock = clock + d
    idle = alive & (d | waiting)
    ok = np.ones(n, bool) if s is None else clock - clock[alive].min() <= s
    pulled, waiting = idle & ok, idle & ~ok
    copies[pulled], pulled_version[pulled] = server, version
    for k, v in (("params", server.copy()), ("staleness", tau), ("delivered", d), ("pulled", pulled),
                 ("waiting", waiting), ("loss", loss)):
      out[k].append(v)
  return {k: np.array(v) for k, v in out.items()}
