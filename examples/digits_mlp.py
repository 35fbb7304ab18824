"""An MLP on scikit-learn's bundled 8x8 digits, trained with synchronous data parallelism on 8 devices.

Run: python examples/digits_mlp.py [--steps 400]
"""
from __future__ import annotations

import argparse

import jdist

jdist.emulate_devices(8)  # 8 CPU devices if this host has only a CPU; before JAX starts

import jax  # noqa: E402
import optax  # noqa: E402

from jdist.data import ArrayLoader  # noqa: E402
from jdist.datasets import digits  # noqa: E402
from jdist.models import mlp  # noqa: E402


def train(steps: int = 400, *, batch_size: int = 128, lr: float = 3e-3, seed: int = 0, verbose: bool = True):
  """Returns ``(test_accuracy, final_loss)`` after ``steps`` data-parallel Adam steps."""
  train_set, test_set = digits(seed=seed)
  devices = jax.devices()
  mesh = jdist.make_mesh(data=len(devices), devices=devices)
  strategy = jdist.data_parallel(mlp.loss, optax.adam(lr), mesh)
  state = strategy.init(mlp.init(jax.random.key(seed), [64, 128, 10]))
  batches = iter(ArrayLoader(train_set, batch_size, seed=seed))
  for _ in range(steps):
    state, metrics = strategy.step(state, strategy.shard_batch(next(batches)))
    if verbose and int(metrics["step"]) % 50 == 0:
      print(f"step {int(metrics['step']):4d}  loss {float(metrics['loss']):.4f}")
  accuracy = float(jax.jit(mlp.accuracy)(state.params, test_set))
  if verbose:
    print(f"{mesh.size} devices ({devices[0].platform}), global batch {batch_size}: "
          f"test accuracy {accuracy:.2%} on {len(test_set['y'])} held-out digits")
  return accuracy, float(metrics["loss"])


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="Adam steps (default 400)")
  train(parser.parse_args().steps)
