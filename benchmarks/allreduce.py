"""AllReduce algorithms on 8 devices, 1 KB to 64 MB: time, bytes per device, and bytes / the ring minimum.

For every algorithm and payload: the median time of one all-reduce (interleaved rounds), the bytes
each device sends according to the compiled HLO (jdist.comm_report), and the ratio of those bytes to
the theoretical minimum 2(N-1)/N x payload (goal for ring and halving_doubling: 1.00 up to padding).
psum is XLA's own; on the CPU backend it moves data through shared memory, so its time is a floor, and
its bytes are not measured: ``comm_report`` charges an all-reduce op the ring's 2(N-1)/N by assumption,
so psum's 1.00 holds by construction. The ppermute algorithms' bytes are read from their permutes.
Writes bench_results/allreduce.json and bench_results/allreduce.png.

Run: python benchmarks/allreduce.py [--quick]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
  print_table,
  save_figure,
  setup_devices,
  time_interleaved,
  write_json,
)

setup_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jdist  # noqa: E402
from jdist.analysis import theory  # noqa: E402
from jdist.collectives import allreduce  # noqa: E402

ALGOS = ("psum", "ring", "halving_doubling", "tree", "hierarchical")


def build(algorithm: str, n_floats: int):
  if algorithm == "hierarchical":
    mesh, axis, spec = jdist.make_mesh(node=2, device=4), ("node", "device"), P(("node", "device"))
  else:
    mesh, axis, spec = jdist.make_mesh(data=8), "data", P("data")
  fn = jax.jit(jax.shard_map(lambda x: allreduce(x[0], axis, algorithm=algorithm, bucket_bytes=2**40)[None],
                             mesh=mesh, in_specs=spec, out_specs=spec, check_vma=algorithm == "psum"))
  x = jax.device_put(jnp.ones((8, n_floats), jnp.float32), NamedSharding(mesh, spec))
  return fn, x


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  sizes = [2**10, 2**14, 2**18, 2**22] + ([] if args.quick else [2**26])  # bytes: 1 KB ... 64 MB
  rows, records = [], []
  for size in sizes:
    n_floats = size // 4
    fns = {}
    reports = {}
    for algorithm in ALGOS:
      fn, x = build(algorithm, n_floats)
      fns[algorithm] = (lambda fn=fn, x=x: fn(x))
      reports[algorithm] = jdist.comm_report(fn.lower(x)).total_sent_bytes
    reps = 2 if size >= 2**24 else 5
    times = time_interleaved(fns, steps=reps, rounds=3 if args.quick else 5)
    minimum = theory.ring_minimum_bytes(size, 8)
    for algorithm in ALGOS:
      inner = 4 if algorithm == "hierarchical" else None
      textbook = theory.allreduce_bytes(size, 8, algorithm, inner=inner)
      ratio = reports[algorithm] / minimum
      rows.append((_fmt(size), algorithm, times[algorithm] * 1e3, reports[algorithm], textbook, ratio))
      records.append({"payload_bytes": size, "algorithm": algorithm, "time_ms": times[algorithm] * 1e3,
                      "sent_bytes": reports[algorithm], "textbook_bytes": textbook, "ratio_to_minimum": ratio})
  print_table("all-reduce of one fp32 payload on 8 emulated devices (bytes are per device, from the compiled HLO)",
              ["payload", "algorithm", "time ms", "sent bytes", "textbook bytes", "sent / 2(N-1)/N payload"], rows)
  write_json("allreduce", {"devices": 8, "platform": jax.devices()[0].platform, "results": records})
  _plot(records)


def _fmt(size: int) -> str:
  return f"{size // 2**20} MB" if size >= 2**20 else f"{size // 2**10} KB"


def _plot(records) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for algorithm in ALGOS:
    rs = [r for r in records if r["algorithm"] == algorithm]
    xs = [r["payload_bytes"] for r in rs]
    a.plot(xs, [r["time_ms"] for r in rs], marker="o", label=algorithm)
    b.plot(xs, [r["sent_bytes"] for r in rs], marker="o", label=algorithm)
  for ax, label in ((a, "time per all-reduce (ms)"), (b, "bytes sent per device")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("jdist AllReduce algorithms, 8 emulated CPU devices")
  fig.tight_layout()
  save_figure(fig, "allreduce")


if __name__ == "__main__":
  main()
