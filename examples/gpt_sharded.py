"""A small GPT trained on "The Zen of Python" with data x FSDP x tensor parallelism on a 2 x 2 x 2 mesh.

Prints how every parameter is laid out (jdist.explain_sharding), then the loss falling, and checks
the sharded run against the same steps on one device (exit status 1 if any parameter differs by more
than 1e-4).

Run: python examples/gpt_sharded.py [--steps 100]
"""
from __future__ import annotations

import argparse
import sys

import jdist

jdist.emulate_devices(8)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jdist.data import ArrayLoader  # noqa: E402
from jdist.datasets import zen_of_python_tokens  # noqa: E402
from jdist.models import gpt  # noqa: E402

CONFIG = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=2, n_heads=4)
TOLERANCE = 1e-4  # max |difference| of the final parameters; the script exits 1 above it


def train(steps: int = 100, *, verbose: bool = True):
  """Returns (losses, max |sharded - single device| of the final params)."""
  mesh = jdist.make_mesh(data=2, fsdp=2, model=2)
  params = gpt.init(jax.random.key(0), CONFIG)
  strategy = jdist.sharded(gpt.loss_fn(CONFIG), optax.adam(1e-3), mesh, rules=gpt.TP_RULES, fsdp_axis="fsdp")
  if verbose:
    print(f"mesh {dict(mesh.shape)}; {CONFIG.num_params() / 1e3:.0f}K parameters; tensor-parallel rules + FSDP:")
    jdist.explain_sharding(params, gpt.TP_RULES, mesh, fsdp_axis="fsdp")
  state = strategy.init(params)
  batches = [b for b, _ in zip(ArrayLoader(zen_of_python_tokens(CONFIG.seq_len), 32, seed=0), range(steps))]
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    losses.append(float(metrics["loss"]))
    if verbose and ((i + 1) % 10 == 0 or i == 0):
      print(f"step {i + 1:4d}  loss {losses[-1]:.4f}")
  # the same steps on one device, plain optax
  opt = optax.adam(1e-3)
  p, s = params, opt.init(params)
  step = jax.jit(lambda p, s, b: (lambda g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(g, s, p)))(jax.grad(gpt.loss_fn(CONFIG))(p, b)))
  for batch in batches:
    p, s = step(p, s, batch)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                         jax.tree.leaves(jax.device_get(p))))
  if verbose:
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; max |sharded - single device| over all parameters: {diff:.2e}")
  return losses, diff


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100, help="Adam steps of each layout (default 100)")
  _, diff = train(parser.parse_args(argv).steps)
  if diff > TOLERANCE:  # fp32 rounding grows slowly with the steps (6e-6 after 100, 2e-5 after 400)
    sys.exit(f"FAILED: the sharded run differs from one device by {diff:.2e} > {TOLERANCE:g}.")


if __name__ == "__main__":
  main()
