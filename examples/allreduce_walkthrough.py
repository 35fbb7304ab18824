"""AllReduce, step by step: what each of 4 devices holds after every step of a ring all-reduce.

The seed article averages four workers' parameters, theta = 1/4 (w1 + w2 + w3 + w4). A ring does it
in 2(N-1) = 6 steps, each device sending one quarter of its vector per step: 3 steps of
reduce-scatter (partial sums travel round the ring) and 3 of all-gather (the finished quarters travel
round). The table is the numpy reference; the JAX ring (ppermute) is run on the same input and checked
equal, then the article's linear regression is trained with every algorithm (exit status 1 unless every
algorithm ends at psum's parameters).

Run: python examples/allreduce_walkthrough.py
"""
from __future__ import annotations

import sys

import jdist

DEVICES = jdist.emulate_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jdist.collectives import allreduce, ring_reference  # noqa: E402
from jdist.datasets import linear_regression  # noqa: E402
from jdist.models import linear  # noqa: E402


def show_ring(n: int = 4) -> np.ndarray:
  # device d starts with [d+1, 10(d+1), 100(d+1), 1000(d+1)]: one chunk per device, easy to follow
  xs = [np.array([1, 10, 100, 1000]) * (d + 1) for d in range(n)]
  print(f"Ring all-reduce on {n} devices. Start (each device's 4 chunks):")
  for d, x in enumerate(xs):
    print(f"  device {d}: {x.tolist()}")
  results, steps = ring_reference(xs, trace=True)
  for phase, step, chunks in steps:
    print(f"after {phase} step {step}:")
    for d, c in enumerate(chunks):
      print(f"  device {d}: {c.reshape(-1).tolist()}")
  print(f"every device now holds the sum {results[0].tolist()}; divided by {n}: the average.\n")
  mesh = jdist.make_mesh(data=n, devices=DEVICES[:n])
  f = jax.jit(jax.shard_map(lambda x: allreduce(x[0], "data", algorithm="ring")[None], mesh=mesh,
                            in_specs=P("data"), out_specs=P("data"), check_vma=False))
  ours = np.asarray(f(np.stack(xs).astype(np.int32)))
  assert (ours == np.stack(results)).all()
  print("The JAX ring (jax.lax.ppermute inside jax.shard_map) gives the same numbers on every device.\n")
  return ours


def train_with_each_algorithm(epochs: int = 100) -> dict[str, np.ndarray]:
  data = linear_regression()
  results = {}
  print(f"The article's linear regression, 4 devices, SGD lr 0.01, {epochs} epochs, with each algorithm:")
  for algorithm in ("psum", "ring", "halving_doubling", "tree", "hierarchical"):
    if algorithm == "hierarchical":
      mesh, axis = jdist.make_mesh(node=2, device=2, devices=DEVICES[:4]), ("node", "device")
    else:
      mesh, axis = jdist.make_mesh(data=4, devices=DEVICES[:4]), "data"
    strategy = jdist.data_parallel(linear.loss, optax.sgd(0.01), mesh, axis=axis,
                                   reducer=jdist.reducers.mean(algorithm))
    state = strategy.init(linear.init())
    batch = strategy.shard_batch(data)
    for _ in range(epochs):
      state, metrics = strategy.step(state, batch)
    p = jax.device_get(state.params)
    results[algorithm] = np.concatenate([p["w"].ravel(), p["b"].ravel()])
    print(f"  {algorithm:<17} w = {p['w'][0, 0]:.7f}  b = {p['b'][0]:.7f}  loss = {float(metrics['loss']):.7f}")
  return results


def main(argv: list[str] | None = None) -> None:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=100,
                      help="full-batch SGD epochs of the article's regression per algorithm (default 100)")
  args = parser.parse_args(argv)
  show_ring()
  results = train_with_each_algorithm(args.epochs)
  for algorithm, values in results.items():
    if not np.allclose(values, results["psum"], rtol=1e-6, atol=0):
      sys.exit(f"FAILED: {algorithm} trained to {values}, psum to {results['psum']} (rtol 1e-6).")
  print("Every algorithm trained to the same parameters as psum.")


if __name__ == "__main__":
  main()
