"""One process of the multi-process tests (run by ``jdist launch`` or directly with ``JDIST_*`` set).

``python tests/_multihost_worker.py train OUT_DIR``: data_parallel and sharded-FSDP for ``STEPS`` steps,
then ``fit`` with checkpoints into ``OUT_DIR/ckpt``; process 0 writes the final params to
``OUT_DIR/result.npz``. ``python tests/_multihost_worker.py spin``: trains until killed, printing its pid
and one line per step. The same setup functions build the single-process reference in the tests.
"""
from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":  # join the other processes before anything touches JAX
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jdist.distributed

  jdist.distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jdist  # noqa: E402
import jdist.distributed  # noqa: E402
from jdist.data import ArrayLoader  # noqa: E402
from jdist.models import mlp  # noqa: E402

STEPS = 20  # steps of the equivalence runs
FIT_STEPS = 10  # steps fit runs on 2 processes before the 1-process resume
TOTAL_FIT_STEPS = 20
BATCH = 64  # global batch
SIZES = [16, 64, 64, 4]


def dataset() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, SIZES[0])).astype(np.float32)
  y = (np.abs(x[:, :4]).argmax(-1)).astype(np.int32)
  return {"x": x, "y": y}


def loader() -> ArrayLoader:
  """The same global batches in every process count; each process yields its share."""
  return ArrayLoader(dataset(), BATCH, seed=1)


def params():
  return mlp.init(jax.random.key(0), SIZES)


def data_parallel_strategy():
  return jdist.data_parallel(mlp.loss, optax.adam(1e-2), jdist.make_mesh(data=-1))


def fsdp_strategy():
  return jdist.sharded(mlp.loss, optax.adam(1e-2), jdist.make_mesh(fsdp=-1), data_axis=None, fsdp_axis="fsdp",
                       fsdp_min_size=256)


def run(strategy, steps: int):
  """``steps`` steps on the loader's batches; returns (params on the host, losses)."""
  state = strategy.init(params())
  batches = iter(loader())
  losses = []
  for _ in range(steps):
    state, metrics = strategy.step(state, strategy.shard_batch(next(batches)))
    losses.append(float(metrics["loss"]))
  return gather(state.params), np.array(losses)


def gather(tree):
  """Every leaf as a full numpy array on every process (collective: all processes call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
  return {f"{prefix}/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def fit_run(directory: str, steps: int):
  strategy = fsdp_strategy()
  ckpt = jdist.CheckpointConfig(directory=os.path.join(directory, "ckpt"), every_steps=5)
  result = jdist.fit(strategy, strategy.init(params()), loader(), steps=steps, checkpoint=ckpt, log_every=1,
                     run_dir=os.path.join(directory, "run"), tensorboard=False)
  return result


def main_train(out: str) -> None:
  results = {}
  for name, make in (("data_parallel", data_parallel_strategy), ("fsdp", fsdp_strategy)):
    p, losses = run(make(), STEPS)
    results.update(flat(name, p))
    results[f"{name}/losses"] = losses
  fitted = fit_run(out, FIT_STEPS)
  results.update(flat("fit", gather(fitted.state.params)))
  if jdist.distributed.is_coordinator():
    np.savez(os.path.join(out, "result.npz"), **results)
  print(f"process {jax.process_index()} of {jax.process_count()} done, {len(jax.devices())} devices", flush=True)


def main_spin() -> None:
  print(f"pid {os.getpid()} process {jax.process_index()}", flush=True)
  strategy = data_parallel_strategy()
  state = strategy.init(params())
  for step, batch in enumerate(loader()):
    state, metrics = strategy.step(state, strategy.shard_batch(batch))
    print(f"step {step} loss {float(metrics['loss']):.4f}", flush=True)
    time.sleep(0.05)


if __name__ == "__main__":
  if sys.argv[1] == "train":
    main_train(sys.argv[2])
  else:
    main_spin()
