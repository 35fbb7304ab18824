"""Where the GPT step's time goes on one GPU: jdist's step and the plain step, each run under JAX's profiler,
their device kernels summed by kind (matmul, attention, reductions, elementwise fusions, copies), side by side.

For each configuration the plain step and every jdist variant (the names of benchmarks/gpu_gpt_ablate.py:
``straight``, ``scan1_dots_saveable``, ...) are warmed up, then ``--steps`` steps run inside
``jax.profiler.trace``. The kernels come from the trace's GPU stream lines (``perfetto_trace.json.gz``, read
with the standard library: no profiler plugin needed). The table gives each kind's milliseconds per step,
the kernel count per step, the time no kernel ran ("idle": launch gaps and host waits), and the wall time
per step measured around the traced steps; the top kernels of each step follow. Writes
bench_results/gpu_profile.json (under $JDIST_BENCH_OUT if set); ``--keep-traces`` also copies each trace
there, to open in ui.perfetto.dev.

Run on a GPU host: python benchmarks/gpu_profile.py [--only 124m|1b] [--variants straight scan1 ...]
    [--steps 5] [--top 12] [--keep-traces]
Without a GPU it prints a clear message and exits 0; ``--cpu-smoke`` runs tiny shapes on the CPU, where the
trace's XLA op lines stand in for the GPU streams (to check the code paths, not to measure).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import jax  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from gpu_gpt import (  # noqa: E402
  CONFIGS,
  cudnn_attention_works,
  host_tokens,
  jdist_runner,
  jdist_setup,
  plain_runner,
  plain_setup,
)
from gpu_gpt_ablate import _patches, parse_variant  # noqa: E402

# Kinds of kernel, first match wins, on the kernel's name and its trace arguments (lower case). cuDNN's
# attention kernels are named after the matrix instructions they use, so attention comes before matmul;
# a reduction fusion ("input_reduce_fusion") before the elementwise fusions.
KINDS = (
    ("attention", r"fmha|flash|sdpa|attention|cudnn"),
    ("matmul", r"gemm|nvjet|xmma|cublas|cutlass|wgmma|matmul|\bdot\b|dot_general|dot\.|convolution"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic.update.slice|dynamic.slice|concatenate|\bpad\b|gather|scatter"),
    ("reduction", r"reduc|softmax|scan"),
    ("elementwise", r"fusion|loop|elementwise|convert|add|multiply"),
)
KIND_NAMES = tuple(k for k, _ in KINDS) + ("other",)
DEFAULT_VARIANTS = ("straight", "scan1", "scan1_dots_saveable")


def kind_of(name: str, args: dict | None = None) -> str:
  """The kind (one of KIND_NAMES) of a kernel called ``name`` with trace arguments ``args``."""
  text = " ".join([name, *(str(v) for v in (args or {}).values())]).lower()
  for kind, pattern in KINDS:
    if re.search(pattern, text):
      return kind
  return "other"


def _read(trace):
  """(events, process names by pid, thread names by (pid, tid)) of a perfetto trace."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = lambda kind: [e for e in events if e.get("ph") == "M" and e.get("name") == kind]
  return (events, {e["pid"]: e["args"]["name"] for e in meta("process_name")},
          {(e["pid"], e["tid"]): e["args"]["name"] for e in meta("thread_name")})


def kernel_events(trace: dict) -> list[dict]:
  """The device kernels of a perfetto trace from ``jax.profiler.trace(..., create_perfetto_trace=True)``.

  On a GPU: the complete ("X") events on the stream lines ("Stream #...") of the "/device:GPU:N" processes
  (the derived "XLA Ops" and "XLA Modules" lines repeat the same time and are skipped), or the "XLA Ops"
  line where a trace has no stream lines. Elsewhere (the CPU, for a smoke test): the XLA executor threads'
  events, less the runtime's own ("Class::method") ones.
  """
  events, procs, threads = _read(trace)
  device_pids = {pid for pid, name in procs.items() if re.search(r"/device:(gpu|tpu)", name.lower())}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  line = lambda e: threads.get((e["pid"], e.get("tid")), "").lower()
  on_device = [e for e in complete if e["pid"] in device_pids]
  for keep in (lambda e: line(e).startswith("stream"), lambda e: line(e) == "xla ops"):
    if chosen := [e for e in on_device if keep(e)]:
      return chosen
  if on_device:  # a layout without stream lines: everything but the derived module and step lines
    return [e for e in on_device if line(e) not in ("xla modules", "steps")]
  return [e for e in complete if "xla" in line(e) and "xlaeigen" not in line(e) and "::" not in e["name"]
          and not e["name"].startswith(("end:", "$"))]


def device_lines(trace: dict) -> dict[str, int]:
  """Complete events per line ("process / thread") of the device processes: what ``kernel_events`` chose from."""
  events, procs, threads = _read(trace)
  return dict(collections.Counter(f"{procs[e['pid']]} / {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
                                  for e in events if e.get("ph") == "X" and e["pid"] in procs
                                  and re.search(r"/device:(gpu|tpu)", procs[e["pid"]].lower())))


def busy_us(events: list[dict]) -> float:
  """Microseconds in which at least one of ``events`` ran (the union of their intervals, over all streams)."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarize(events: list[dict], steps: int, wall_s: float, top: int = 12) -> dict:
  """Per-step milliseconds by kind, kernel count, busy and idle time, and the ``top`` kernels by time."""
  by_kind: dict[str, float] = collections.defaultdict(float)
  by_name: dict[str, list] = {}
  for e in events:
    kind = kind_of(e["name"], e.get("args"))
    by_kind[kind] += e["dur"]
    entry = by_name.setdefault(e["name"], [0.0, 0, kind])
    entry[0] += e["dur"]
    entry[1] += 1
  ms = lambda us: us / 1e3 / steps
  busy = busy_us(events)
  wall_ms = wall_s * 1e3 / steps
  return {
      "wall_ms": wall_ms,
      "kernel_ms": ms(sum(by_kind.values())),
      "busy_ms": ms(busy),
      "idle_ms": max(wall_ms - ms(busy), 0.0),
      "kernels_per_step": len(events) / steps,
      "kinds_ms": {k: ms(by_kind.get(k, 0.0)) for k in KIND_NAMES},
      "top": [{"name": name, "kind": kind, "ms": ms(us), "calls_per_step": n / steps}
              for name, (us, n, kind) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
  }


def profile(run, steps: int, log_dir: pathlib.Path) -> tuple[dict, float, pathlib.Path]:
  """Warms ``run`` (one step, returns something to block on) up, then traces ``steps`` steps.

  Returns (the perfetto trace as a dict, wall seconds of the traced steps, the trace file).
  """
  for _ in range(3):
    out = run()
  jax.block_until_ready(out)
  with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    wall = time.perf_counter() - t
  path = max(log_dir.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  with gzip.open(path) as f:
    return json.load(f), wall, path


def step_fns(shape, impl, variant: str | None, plain):
  """A function running one step of jdist's ``variant`` (None: the plain step), on fixed tokens."""
  if variant is None:
    return plain_runner(plain, host_tokens(shape), {})
  _, unroll, remat = parse_variant(variant)
  strategy, cfg = jdist_setup(shape, impl, remat, unroll)
  run_jdist = jdist_runner(strategy, cfg, host_tokens(shape), {})
  with _patches(variant):  # the variant's patches hold while the step is traced, on its first call
    jax.block_until_ready(run_jdist())
  return run_jdist


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=["124m", "1b"], default=None)
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                      help="jdist variants (benchmarks/gpu_gpt_ablate.py's names), each profiled beside the plain step")
  parser.add_argument("--steps", type=int, default=5, help="traced steps of each")
  parser.add_argument("--top", type=int, default=12, help="kernels listed per step")
  parser.add_argument("--keep-traces", action="store_true", help="copy each trace next to the JSON")
  parser.add_argument("--quick", action="store_true", help="what `jdist bench --quick` passes: fewer steps")
  parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, to check the code paths")
  args = parser.parse_args()
  if args.quick:
    args.steps = min(args.steps, 2)
  for v in args.variants:
    parse_variant(v)
  device = jax.devices()[0]
  if args.cpu_smoke:
    names, impl = ["cpu-smoke"], None
  elif device.platform != "gpu":
    print(f"benchmarks/gpu_profile.py needs a GPU; this host's JAX sees {device.platform} devices only. Skipping. "
          f"(--cpu-smoke runs tiny shapes here.)")
    return
  else:
    names = [args.only] if args.only else ["124m", "1b"]
    impl = "cudnn" if cudnn_attention_works() else None
  out = pathlib.Path(os.environ.get("JDIST_BENCH_OUT", "bench_results"))
  results = {"device": getattr(device, "device_kind", device.platform), "jax": jax.__version__,
             "steps": args.steps, "runs": []}
  rows, tops = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      shape = CONFIGS[name]
      plain = plain_setup(shape, impl)
      for variant in [None, *args.variants]:
        label = variant or "plain"
        try:
          run = step_fns(shape, impl, variant, plain)
          trace, wall, path = profile(run, args.steps, pathlib.Path(tmp) / f"{name}_{label}")
        except Exception as e:  # noqa: BLE001 (recorded; the run goes on)
          results["runs"].append({"config": name, "variant": label, "error": f"{type(e).__name__}: {str(e)[:400]}"})
          print(results["runs"][-1], flush=True)
          continue
        s = summarize(kernel_events(trace), args.steps, wall, args.top)
        results["runs"].append({"config": name, "variant": label, **s, "device_lines": device_lines(trace)})
        if args.keep_traces:
          out.mkdir(parents=True, exist_ok=True)
          shutil.copy(path, out / f"trace_{name}_{label}.json.gz")
        write_json("gpu_profile", results)
        rows.append((name, label, s["wall_ms"], s["busy_ms"], s["idle_ms"], *(s["kinds_ms"][k] for k in KIND_NAMES),
                     s["kernels_per_step"]))
        tops.append((name, label, s["top"]))
        del trace
  print_table(f"Where the GPT step's time goes on {results['device']}: ms per step of {args.steps} traced steps "
              f"(kinds: device kernel time; idle: wall time no kernel ran)",
              ["config", "step", "wall ms", "busy ms", "idle ms", *KIND_NAMES, "kernels"], rows)
  for name, label, top in tops:
    print_table(f"{name} {label}: top kernels", ["kernel", "kind", "ms/step", "calls/step"],
                [(t["name"][:90], t["kind"], t["ms"], t["calls_per_step"]) for t in top])
  if any("error" in r for r in results["runs"]):
    sys.exit("some steps failed; their errors are in the JSON and above")


if __name__ == "__main__":
  main()
