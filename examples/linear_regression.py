"""The seed article's problem done right: y = 2x + 1 on x = 1..8, data parallel over 4 devices.

Each of the 4 devices holds a full replica of (w, b) and 2 of the 8 samples. Every epoch each replica
computes the gradient of its 2 samples, the gradients are averaged across devices (AllReduce), and
every replica applies the same SGD step (lr 0.01). That is exactly full-batch SGD on one device, which
the script checks (exit status 1 if they differ by more than 1e-5), and trained long enough it finds
w = 2, b = 1.

Run: python examples/linear_regression.py [--epochs 100]
"""
from __future__ import annotations

import argparse
import sys

import jdist

DEVICES = jdist.emulate_devices(4)[:4]  # CPU devices, before JAX starts: works on any host

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jdist.datasets import linear_regression  # noqa: E402
from jdist.models import linear  # noqa: E402


def _shards(array: jax.Array) -> dict[int, np.ndarray]:
  """Device id -> the values that device holds."""
  return {s.device.id: np.ravel(np.asarray(s.data)) for s in array.addressable_shards}


def train(epochs: int, *, lr: float = 0.01, verbose: bool = True):
  """Trains for ``epochs`` full-batch steps; returns ``(params, losses)`` as numpy values."""
  data = linear_regression()
  mesh = jdist.make_mesh(data=4, devices=DEVICES)
  strategy = jdist.data_parallel(linear.loss, optax.sgd(lr), mesh)
  state = strategy.init(linear.init(in_features=1, out_features=1))
  batch = strategy.shard_batch(data)
  if verbose:
    print("Each device's shard of the data (x -> y):")
    xs, ys = _shards(batch["x"]), _shards(batch["y"])
    for device in sorted(xs):
      pairs = ", ".join(f"{a:g} -> {b:g}" for a, b in zip(xs[device], ys[device]))
      print(f"  device {device}: {pairs}")
  losses = []
  for epoch in range(1, epochs + 1):
    state, metrics = strategy.step(state, batch)
    losses.append(float(metrics["loss"]))
    if verbose and (epoch % 10 == 0 or epoch == 1):
      print(f"epoch {epoch:5d}  loss {losses[-1]:.6f}")
  params = jax.device_get(state.params)
  if verbose:
    print(f"final w = {float(params['w'][0, 0]):.6f}, b = {float(params['b'][0]):.6f} (exact answer: w = 2, b = 1)")
  return params, losses


def single_device(epochs: int, *, lr: float = 0.01):
  """The reference: plain optax full-batch SGD on one device."""
  data = linear_regression()
  params = linear.init(in_features=1, out_features=1)
  opt = optax.sgd(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(linear.loss)(params, data)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(epochs):
    params, opt_state = step(params, opt_state)
  return jax.device_get(params)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=100,
                      help="full-batch SGD epochs (default 100; 3000 reaches w = 2, b = 1)")
  args = parser.parse_args(argv)
  params, _ = train(args.epochs)
  ref = single_device(args.epochs)
  diff = max(float(np.max(np.abs(params[k] - ref[k]))) for k in params)
  print(f"max |data parallel - single device| after {args.epochs} epochs: {diff:.2e}")
  if diff > 1e-5:
    sys.exit(f"FAILED: data parallel differs from one device by {diff:.2e} > 1e-5.")
  if args.epochs < 2000:
    print("(the slow direction of this problem needs ~3000 epochs at lr 0.01: try --epochs 3000)")


if __name__ == "__main__":
  main()
