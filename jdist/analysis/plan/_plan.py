"""``plan``: rank the layouts jdist can run for a GPT on a cluster, compiled from shapes where they can be.

The pieces meet like this. Every candidate layout is costed by the textbook (``textbook_costs``) and timed
(``step_time``); the best ones are then compiled for real, on emulated CPU devices, at a few layers per pipeline
stage, and their per-device memory, collectives and FLOPs are extrapolated linearly to the full depth (a scan
over layers makes each extra layer add the same: tested). Layers beyond the compiled ones, and a data axis
too wide to emulate (its gradient all-reduce), are the analytical part. Memory and "fits?" come from the
compiled program where there is one; the step time always from the textbook figures, because XLA:CPU
partitions some collectives unlike GPU/TPU back ends (all-reduces where reduce-scatters belong, merged
re-gathers) and runs attention unfused: the table shows both byte counts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from jdist.analysis.plan._cluster import Cluster, load_cluster
from jdist.analysis.plan._compile import CompileJob, run_jobs
from jdist.analysis.plan._config import layout_config, model_fields
from jdist.analysis.plan._costs import Costs, textbook_costs
from jdist.analysis.plan._layout import Layout, candidates
from jdist.analysis.plan._shape import TransformerShape
from jdist.analysis.plan._time import Timing, step_time
from jdist.errors import OptionError

USABLE_MEMORY = 0.9  # share of a device's memory a layout may plan for: the rest is the runtime's and the allocator's
GiB = 2**30


class DoesNotFitError(ValueError):
  """No layout tried fits the devices' memory.

  Attributes:
    needed_gib: the least memory per device of any layout tried. available_gib: what a device has.
    layout: the layout that needs the least.
  """

  def __init__(self, model: str, needed_gib: float, available_gib: float, layout: Layout, cluster: Cluster):
    self.needed_gib, self.available_gib, self.layout = needed_gib, available_gib, layout
    super().__init__(f"{model} does not fit: needs {needed_gib:.1f} GiB per device, the cluster has {available_gib:g} "
                     f"({cluster.device}; {USABLE_MEMORY:.0%} of it is planned for). The smallest layout tried was "
                     f"{layout.label()}. Use more devices (--devices), a smaller batch, or devices with more memory.")


@dataclasses.dataclass(frozen=True)
class Compiled:
  """Per-device figures read from a compiled program, extrapolated to the full depth."""

  memory_bytes: float  # argument + output - aliased + temporaries (compiled.memory_analysis())
  param_bytes: float
  optimizer_bytes: float
  temp_bytes: float
  flops: float  # matmul FLOPs counted in the HLO (XLA:CPU: attention unfused, not causal-halved)
  collectives: dict  # kind -> (count, payload bytes, bytes sent per device)
  depths: tuple  # layers per stage compiled
  devices: int  # devices the program was compiled for
  data_axis_textbook: bool  # the data axis was too wide to emulate: its all-reduce is the textbook's
  seconds: float  # compile time (0 when read from the cache)

  @property
  def sent_bytes(self) -> float:
    return sum(v[2] for v in self.collectives.values())


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One layout: its textbook costs, the predicted timing (from them), what compiling it showed (or None)."""

  layout: Layout
  textbook: Costs
  timing: Timing
  compiled: Compiled | None
  memory_bytes: float  # the compiled figure where there is one, else the textbook's
  fits: bool
  tokens_per_s: float
  timing_compiled_bytes: Timing | None = None  # the same model with the collectives scaled to the compiled bytes

  @property
  def bytes_ratio(self) -> float | None:
    """Bytes the compiled program sends per device over the textbook's (None when not compiled)."""
    sent = self.textbook.sent_bytes()
    return None if self.compiled is None or not sent else self.compiled.sent_bytes / sent


def _extrapolate(results: Sequence[dict], depths: Sequence[int], target: int) -> dict:
  """Linear in layers per stage, through the two compiled depths (exact for a scanned stack: each layer the same)."""
  if len(results) == 1:
    return {**results[0], "compile_seconds": results[0]["compile_seconds"] * (not results[0].get("cached"))}
  (a, b), (ka, kb) = results, depths
  f = (target - ka) / (kb - ka)
  lin = lambda x, y: x + (y - x) * f
  out = {"memory": {k: lin(a["memory"][k], b["memory"][k]) for k in a["memory"]}}
  for k in ("param_bytes", "optimizer_bytes", "flops"):
    out[k] = lin(a[k], b[k])
  kinds = set(a["collectives"]) | set(b["collectives"])
  zero = [0, 0, 0.0]
  out["collectives"] = {k: [lin(x, y) for x, y in zip(a["collectives"].get(k, zero), b["collectives"].get(k, zero))]
                        for k in kinds}
  out["compile_seconds"] = sum(r["compile_seconds"] * (not r.get("cached")) for r in results)
  return out


def _compile_plan(model: Any, layout: Layout, batch: int, optimizer: str, max_devices: int):
  """(jobs, depths, data axis compiled?) for ``layout``, or None when even one data replica is too wide."""
  per_stage = model.n_layers // layout.pipe
  depths = (per_stage,) if per_stage <= 4 else (2, 4)
  if layout.devices <= max_devices:
    data_c = layout.data
  elif layout.devices // layout.data <= max_devices:
    data_c = 1
  else:
    return None
  axes = {"data": data_c, "pipe": layout.pipe, "fsdp": layout.fsdp, "model": layout.model}
  axes = tuple((a, n) for a, n in axes.items() if n > 1 or (a == "data" and layout.strategy == "data_parallel"))
  group_batch = batch // (layout.data * layout.fsdp)
  fields = model_fields(model)
  jobs = []
  for k in depths:
    kw = dict(fields, n_layers=k * layout.pipe, remat=layout.remat if layout.remat != "selective" else "dots_saveable",
              attention_impl="xla")
    jobs.append(CompileJob(model=tuple(sorted(kw.items())), strategy=layout.strategy, axes=axes,
                           batch=group_batch * data_c * layout.fsdp, microbatches=layout.microbatches,
                           optimizer=optimizer))
  return jobs, depths, data_c == layout.data


def _compiled(raw: dict, depths, devices: int, data_ok: bool, layout: Layout) -> Compiled:
  mem = raw["memory"]
  total = mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"] \
      + mem["temp_size_in_bytes"]
  collectives = {k: tuple(v) for k, v in raw["collectives"].items()}
  if not data_ok and layout.data > 1:  # the data axis' gradient all-reduce, by the textbook
    grads = raw["param_bytes"]
    count, payload, sent = collectives.get("all-reduce", (0, 0, 0.0))
    collectives["all-reduce"] = (count + 1, payload + grads, sent + 2 * (layout.data - 1) / layout.data * grads)
  return Compiled(memory_bytes=total, param_bytes=raw["param_bytes"], optimizer_bytes=raw["optimizer_bytes"],
                  temp_bytes=mem["temp_size_in_bytes"], flops=raw["flops"], collectives=collectives,
                  depths=tuple(depths), devices=devices, data_axis_textbook=not data_ok,
                  seconds=raw["compile_seconds"])


def _row(shape: TransformerShape, layout: Layout, batch: int, cluster: Cluster, compiled: Compiled | None) -> PlanRow:
  costs = textbook_costs(shape, layout, batch)
  timing = step_time(costs, layout, cluster)
  memory = compiled.memory_bytes if compiled is not None else costs.memory_bytes
  alt = None
  if compiled is not None and costs.sent_bytes():
    r = compiled.sent_bytes / costs.sent_bytes()
    scaled = tuple(dataclasses.replace(c, sent_bytes=c.sent_bytes * r) for c in costs.collectives)
    alt = step_time(dataclasses.replace(costs, collectives=scaled), layout, cluster)
  return PlanRow(layout=layout, textbook=costs, timing=timing, compiled=compiled, memory_bytes=memory,
                 fits=memory <= USABLE_MEMORY * cluster.memory_bytes, tokens_per_s=batch * shape.seq_len / timing.step,
                 timing_compiled_bytes=alt)


def _step(row: PlanRow, rank_by: str) -> float:
  if rank_by == "compiled" and row.timing_compiled_bytes is not None:
    return row.timing_compiled_bytes.step
  return row.timing.step


def _rank(rows: Sequence[PlanRow], rank_by: str = "textbook") -> list[PlanRow]:
  """Those that fit first, fastest first (by the textbook bytes, or ``rank_by="compiled"``: the compiled program's
  where there is one); then the rest, smallest memory first."""
  return sorted(rows, key=lambda r: (not r.fits, _step(r, rank_by) if r.fits else r.memory_bytes))


@dataclasses.dataclass
class Plan:
  """The ranked layouts for a model on a cluster (``rows``, best first: those that fit, fastest first)."""

  shape: TransformerShape
  cluster: Cluster
  batch: int
  optimizer: str
  rows: list
  model: Any = None  # the GPTConfig, when the plan compiled jdist's GPT
  seconds: float = 0.0  # planning time
  compile_seconds: float = 0.0  # of which compiling (not counting cache hits)
  rank_by: str = "textbook"

  @property
  def best(self) -> PlanRow:
    """The fastest layout that fits. Raises ``DoesNotFitError`` when none does."""
    if not self.rows or not self.rows[0].fits:
      least = min(self.rows, key=lambda r: r.memory_bytes)
      raise DoesNotFitError(self.shape.name, least.memory_bytes / GiB, self.cluster.memory_gib, least.layout,
                            self.cluster)
    return self.rows[0]

  def config(self, row: PlanRow | None = None, *, run_dir: str = "runs/plan") -> str:
    """``row`` (default: the best) as a ready TOML config for ``jdist train``."""
    row = row or self.best
    if self.model is None:
      raise OptionError("plan.model", None, "a GPTConfig (this plan was made from a TransformerShape alone)")
    header = (f"written by jdist plan: {self.cluster.devices} x {self.cluster.device} ({self.cluster.name}), "
              f"{row.layout.label()}\npredicted {row.timing.step * 1e3:.1f} ms/step, {row.timing.mfu:.1%} MFU, "
              f"{row.memory_bytes / GiB:.2f} GiB per device")
    return layout_config(row.layout, self.model, self.batch, self.optimizer, header=header, run_dir=run_dir)

  def table(self, top: int | None = 12) -> str:
    """The ranked table (``top`` rows; None: all)."""
    head = (f"{'#':>2}  {'layout':<40}{'strategy':<14}{'fits':<5}{'GiB/dev':>8}{'ms/step':>9}{'MFU':>7}"
            f"{'comm':>7}{'bubble':>7}  {'GB sent/dev: textbook':>22}{'compiled':>10}{'ms if compiled bytes':>22}")
    lines = [self.summary(), "", head, "-" * len(head)]
    for i, r in enumerate(self.rows[:top] if top else self.rows, 1):
      sent_c, alt = "-", "-"
      if r.compiled:
        sent_c = f"{r.compiled.sent_bytes / 1e9:,.1f}" + ("!" if (r.bytes_ratio or 0) > 1.5 else " ")
        alt = f"{r.timing_compiled_bytes.step * 1e3:.1f}" if r.timing_compiled_bytes else "-"
      mem = f"{r.memory_bytes / GiB:.2f}" + ("" if r.compiled else "*")
      lines.append(f"{i:>2}  {r.layout.label():<40}{r.layout.strategy:<14}{'yes' if r.fits else 'no':<5}{mem:>8}"
                   f"{r.timing.step * 1e3:>9.1f}{r.timing.mfu:>7.1%}{r.timing.comm_share:>7.1%}"
                   f"{r.timing.bubble_share:>7.1%}  {r.textbook.sent_bytes() / 1e9:>21,.1f} {sent_c:>10}{alt:>22}")
    lines += ["", "GiB/dev: memory per device of the compiled program (* the textbook's estimate: not compiled). "
              "ms/step, MFU, comm (exposed collectives' share of the step) and bubble: the step-time model on the "
              "textbook FLOPs and bytes, because XLA:CPU partitions collectives unlike GPU/TPU back ends; the compiled "
              "program's bytes (! over 1.5x the textbook's) and the step they would give are shown next to them."]
    best = self.rows[0] if self.rows else None
    if best is not None and best.fits and (best.bytes_ratio or 0) > 3:
      lines += ["", f"Note: the first row's compiled program sends {best.bytes_ratio:.1f}x the textbook's bytes (see "
                f"explain()). If the target's compiler partitions it the same way, its step takes "
                f"{best.timing_compiled_bytes.step * 1e3:.1f} ms, not {best.timing.step * 1e3:.1f}; rank by that "
                f"with rank_by=\"compiled\" (--rank-by compiled)."]
    return "\n".join(lines)

  def summary(self) -> str:
    return (f"{self.shape.name}: {self.shape.num_params() / 1e9:.2f}B parameters, batch {self.batch} x "
            f"{self.shape.seq_len} tokens, on {self.cluster.summary()}. {len(self.rows)} layouts, "
            f"{sum(r.compiled is not None for r in self.rows)} compiled; planned in {self.seconds:.1f} s "
            f"({self.compile_seconds:.1f} s compiling).")

  def explain(self, index: int = 0) -> str:
    """Row ``index``'s collectives, compiled and textbook, and its step-time parts."""
    r = self.rows[index]
    t = r.timing
    lines = [f"{r.layout.label()} ({r.layout.strategy})",
             f"  step {t.step * 1e3:.2f} ms = compute {t.compute * 1e3:.2f} + tensor {t.tensor * 1e3:.2f} + pipe "
             f"{t.pipe * 1e3:.2f} + bubble {t.bubble * 1e3:.2f} + exposed data/FSDP {t.data * 1e3:.2f} "
             f"(of {t.data_total * 1e3:.2f})",
             "  textbook collectives (used for the time):"]
    lines += [f"    {c.axis:<6}{c.kind:<20}{c.count:>6} x {c.payload_bytes / 1e6:,.2f} MB, "
              f"sent {c.sent_bytes / 1e6:,.2f} MB"
              for c in r.textbook.collectives] or ["    none"]
    if r.compiled:
      c = r.compiled
      lines.append(f"  compiled on {c.devices} emulated devices at {c.depths} layers/stage"
                   + (" (data axis: textbook)" if c.data_axis_textbook else "") + ":")
      lines += [f"    {k:<26}{int(round(v[0])):>6} ops, sent {v[2] / 1e6:,.2f} MB"
                for k, v in sorted(c.collectives.items())]
      lines.append(f"  memory {c.memory_bytes / GiB:.3f} GiB: params {c.param_bytes / GiB:.3f}, optimizer "
                   f"{c.optimizer_bytes / GiB:.3f}, temporaries {c.temp_bytes / GiB:.3f}; matmul FLOPs {c.flops:.3g} "
                   f"(textbook for this cluster {r.textbook.flops:.3g}; compiled counts every branch of a conditional "
                   f"as if it ran, as comm_report does: an upper bound for the pipeline's per-tick switch)")
    return "\n".join(lines)


def plan(model: Any, cluster: str | Cluster, *, batch: int, devices: int | None = None, optimizer: str = "adam",
         remats: Sequence[str] = ("none", "dots_saveable", "full"), compile: bool = True, compile_top: int = 6,
         max_compile_devices: int = 64, cache: Any = None, layouts: Sequence[Layout] | None = None,
         rank_by: str = "textbook") -> Plan:
  """Ranks the layouts jdist can run for ``model`` on ``cluster``.

  Args:
    model: jdist's ``GPTConfig`` (compiled and costed), or a ``TransformerShape`` (costed only).
    cluster: a shipped cluster's name (``jdist.analysis.plan.available_clusters()``), a TOML file, or a ``Cluster``.
    batch: the global batch, in sequences.
    devices: how many devices (default: the cluster file's).
    optimizer: "adam", "adamw", "sgd" or "momentum" (what the compiled step carries).
    remats: the recomputation policies to try.
    compile: compile the ``compile_top`` best layouts on emulated devices, re-rank, and repeat until the top rows
      are compiled (at most 4 x ``compile_top`` layouts); a layout whose data replica spans more than
      ``max_compile_devices`` devices stays textbook.
    cache: where compiled results are kept (default ~/.cache/jdist/plan; False: no cache).
    layouts: the layouts to cost instead of the enumerated candidates.
    rank_by: "textbook" (the step time from the textbook's bytes: the default, as XLA:CPU partitions some
      collectives unlike GPU/TPU) or "compiled" (from the compiled program's bytes where there is one: the
      conservative choice when the target's compiler partitions like XLA:CPU).

  Returns:
    A ``Plan``: ``.table()``, ``.best`` (raises ``DoesNotFitError`` when nothing fits), ``.config()``.

  Example:
    >>> p = jdist.plan(gpt.GPTConfig(d_model=4096, n_layers=32, n_heads=32, seq_len=2048, vocab_size=32768,
    ...                compute_dtype=jnp.bfloat16), "h100-8x", devices=64, batch=256)  # doctest: +SKIP
    >>> print(p.table()); open("plan.toml", "w").write(p.config())  # doctest: +SKIP
  """
  start = time.perf_counter()
  if rank_by not in ("textbook", "compiled"):
    raise OptionError("rank_by", rank_by, "'textbook' or 'compiled'")
  cluster = load_cluster(cluster, devices)
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise OptionError("batch", batch, "a positive int (sequences per step)")
  is_gpt = not isinstance(model, TransformerShape)
  platform = "gpu" if "NVIDIA" in cluster.device else "other"
  shape = TransformerShape.from_gpt(model, flash_attention=None if platform == "gpu" else False) if is_gpt else model
  todo = list(layouts) if layouts is not None else list(candidates(shape, cluster.devices, batch, remats=remats))
  if not is_gpt:
    todo = [dataclasses.replace(lay, strategy="analytic") for lay in todo]
  if not todo:
    raise OptionError("batch", batch, f"divisible by some data-parallel degree of {cluster.devices} devices "
                      "(no layout splits it)")
  rows = _rank([_row(shape, lay, batch, cluster, None) for lay in todo])
  compiled_s = 0.0
  if compile and is_gpt:
    rows, compiled_s = _compile_rows(rows, model, shape, batch, cluster, optimizer, compile_top, max_compile_devices,
                                     cache, rank_by)
  return Plan(shape=shape, cluster=cluster, batch=batch, optimizer=optimizer, rows=_rank(rows, rank_by),
              model=model if is_gpt else None, seconds=time.perf_counter() - start, compile_seconds=compiled_s,
              rank_by=rank_by)


def _compile_rows(rows, model, shape, batch, cluster, optimizer, top, max_devices, cache, rank_by):
  """Compiles the ``top`` best rows, re-ranks with what compiling showed (a layout the textbook thought fits may
  not), and repeats until the first ``top`` rows that can be compiled are, or 4 x ``top`` layouts were compiled."""
  rows, seconds, tried = _rank(rows, rank_by), 0.0, set()
  while len(tried) < 4 * top:
    todo = [i for i, r in enumerate(rows[:top]) if r.compiled is None and r.layout not in tried]
    if not todo:
      break
    plans = {i: _compile_plan(model, rows[i].layout, batch, optimizer, max_devices) for i in todo}
    tried.update(rows[i].layout for i in todo)
    plans = {i: p for i, p in plans.items() if p is not None}
    results = iter(run_jobs([job for p in plans.values() for job in p[0]], cache=cache))
    for i, (jobs_i, depths, data_ok) in plans.items():
      raw = _extrapolate([next(results) for _ in jobs_i], depths, model.n_layers // rows[i].layout.pipe)
      seconds += raw["compile_seconds"]
      rows[i] = _row(shape, rows[i].layout, batch, cluster, _compiled(raw, depths, jobs_i[0].devices, data_ok,
                                                                         rows[i].layout))
    rows = _rank(rows, rank_by)
  return rows, seconds
