"""Pipeline parallelism, drawn and run: the schedule tables for p=4 stages and m=8 micro-batches, then the
GPT trained as a 4-stage pipeline on "The Zen of Python" under any schedule.

This is the seed article's model parallelism taken literally: different layers on different devices,
activations passed along. Each row of a table is a tick; each column a device; the number is the
micro-batch that device works on ('.' = idle, the bubble; 'F3' / 'B3' / 'W3' its forward / backward /
weight gradient; '3.1' on the device's second virtual stage).

The GPT has one block per virtual stage: 4 blocks, or 8 for the schedules with two virtual stages per
device ("circular", "interleaved_1f1b", "zbv"). The trained parameters are checked against the same blocks
run in sequence on one device (exit status 1 if any differs by more than 1e-4).

Run: python examples/pipeline.py [--steps 60] [--schedule gpipe|circular|1f1b|interleaved_1f1b|zb_h1|zbv]
     [--remat nothing_saveable|dots_saveable]
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
from jdist.strategies.pipeline import SCHEDULES, pipeline, pipeline_schedule, unstack_params  # noqa: E402

CONFIG = gpt.GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=4, n_heads=4)
TWO_PER_DEVICE = ("circular", "interleaved_1f1b", "zbv")  # schedules that run 2 virtual stages per device
TOLERANCE = 1e-4  # max |difference| of the final parameters; the script exits 1 above it


def show_schedules() -> None:
  print("GPipe, p=4 stages, m=8 micro-batches (forward ticks; backward runs them in reverse):")
  print(pipeline_schedule(4, 8, "gpipe").format())
  print("\nCircular, p=4 devices x v=2 virtual stages each, m=8 ('i.l' = micro-batch i on lap l):")
  print(pipeline_schedule(4, 8, "circular", repeats=2).format())
  print("\n1F1B, p=4, m=8 (forward and backward ticks; each backward frees its micro-batch's stash slot):")
  print(pipeline_schedule(4, 8, "1f1b").format())
  print("\nInterleaved 1F1B (Megatron), p=4 x v=2, m=8: 1F1B's order over virtual stages, round-robin:")
  print(pipeline_schedule(4, 8, "interleaved_1f1b").format())
  print("\nZB-H1, p=4, m=8: the backward split in B (input gradient) and W (weight gradient), W filling the drain:")
  print(pipeline_schedule(4, 8, "zb_h1").format())
  print("\nZB-V, p=4 x 2 stages in a V (device d: stages d and 7 - d), m=8:")
  print(pipeline_schedule(4, 8, "zbv").format())


def train(steps: int = 60, *, schedule: str = "gpipe", remat: str | None = None, verbose: bool = True):
  """Returns (losses, max |pipeline - sequential| of the final params)."""
  config = gpt.GPTConfig(**{**CONFIG.__dict__, "n_layers": 8 if schedule in TWO_PER_DEVICE else 4})
  stage_fn, loss_fn, input_fn, to_pipeline = gpt.pipeline_fns(config)
  mesh = jdist.make_mesh(pipe=4, devices=jax.devices()[:4])
  strategy = pipeline(stage_fn, loss_fn, optax.adam(1e-3), mesh, microbatches=8, schedule=schedule,
                      input_fn=input_fn, remat=remat)
  if verbose:
    print(f"training {strategy.name}" + (f", remat={remat}" if remat else ""))
  params = to_pipeline(gpt.init(jax.random.key(0), config))
  state = strategy.init(params)
  batches = [b for b, _ in zip(ArrayLoader(zen_of_python_tokens(CONFIG.seq_len), 32, seed=0), range(steps))]
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    losses.append(float(metrics["loss"]))
    if verbose and ((i + 1) % 10 == 0 or i == 0):
      print(f"step {i + 1:4d}  loss {losses[-1]:.4f}  bubble {float(metrics['bubble']):.3f}")
  # the same blocks in sequence on one device
  opt = optax.adam(1e-3)
  seq_loss = lambda p, b: gpt.loss({"blocks": p["stages"], "wte": p["wte"], "wpe": p["wpe"], "lnf": p["lnf"]},
                                   b, config)
  p, s = params, opt.init(params)

  @jax.jit
  def step(p, s, b):
    g = jax.grad(seq_loss)(p, b)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for batch in batches:
    p, s = step(p, s, batch)
  ours = unstack_params(jax.device_get(state.params), strategy.info["schedule"])
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(jax.device_get(p))))
  if verbose:
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; max |pipeline - sequential| over all parameters: {diff:.2e}")
  return losses, diff


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  parser.add_argument("--steps", type=int, default=60, help="Adam steps of the GPT (default 60)")
  parser.add_argument("--schedule", choices=SCHEDULES, default="gpipe",
                      help="the pipeline schedule the GPT trains under (default gpipe)")
  parser.add_argument("--remat", choices=["nothing_saveable", "dots_saveable"], default=None,
                      help="keep less for the backward and run the forward again (default: keep every residual)")
  args = parser.parse_args(argv)
  show_schedules()
  print()
  _, diff = train(args.steps, schedule=args.schedule, remat=args.remat)
  if diff > TOLERANCE:
    sys.exit(f"FAILED: the pipeline differs from the layers run in sequence by {diff:.2e} > {TOLERANCE:g}.")


if __name__ == "__main__":
  main()
