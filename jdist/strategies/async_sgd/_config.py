"""The emulated parameter server's hyperparameters: one frozen value, checked once, read by every piece of a tick."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import numpy as np

from jdist._checks import check_choice, check_positive_int
from jdist.errors import OptionError
from jdist.strategies.async_sgd._delays import DelayModel, every_tick, real_number

NEVER = int(np.iinfo(np.int32).max)  # the failure tick of a worker that never fails
APPLY = ("mean", "each")
STALENESS_LR = (None, "inverse")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AsyncConfig:
  """What one emulated parameter server does each tick (``async_sgd``'s options after checking).

  Built by ``async_sgd``; the tick's pieces (``deliveries``, ``gate``, ``apply_mean`` / ``apply_each``, the pull)
  are module-level functions of it, so each can be called and tested alone.
  """

  num_workers: int  # N, the emulated workers (>= 1); a multiple of `devices`
  devices: int = 1  # D, the devices on the workers axis: each runs N / D workers (vmapped)
  axis: str = "workers"  # the mesh axis the workers' copies and the server's pieces are split over
  max_staleness: int | None = None  # SSP's bound s, in clocks (gradients delivered); None: no bound; 0: BSP
  apply: Literal["mean", "each"] = "mean"  # a tick's delivered gradients: averaged into one update, or one each
  staleness_lr: Literal["inverse"] | None = None  # "inverse": an update scaled by 1 / max(1, its mean staleness)
  delay_compensation: float = 0.0  # DC-ASGD's lambda (>= 0; 0 is off)
  fail: tuple[int, ...] = ()  # per worker, the tick from which it is dead (NEVER: never); () when none fails
  delay: DelayModel = dataclasses.field(default_factory=every_tick)  # when computing workers finish (pauses included)

  def __post_init__(self):
    put = lambda name, value: object.__setattr__(self, name, value)  # normalised values (a numpy int -> int)
    n = check_positive_int(self.num_workers, "num_workers")
    put("num_workers", n)
    put("devices", check_positive_int(self.devices, "devices"))
    if n % self.devices:
      raise OptionError("num_workers", n, f"a multiple of the {self.devices} devices on mesh axis {self.axis!r}",
                        f"Use a multiple of {self.devices} workers, or a mesh with an axis size that divides {n}, e.g. "
                        f"jdist.make_mesh({self.axis}={np.gcd(n, self.devices)}, "
                        f"devices=jax.devices()[:{np.gcd(n, self.devices)}]).")
    s = self.max_staleness
    if s is not None and (not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0):
      raise OptionError("max_staleness", s, "None (no bound) or an int >= 0 (0 is synchronous)")
    put("max_staleness", None if s is None else int(s))
    check_choice(self.apply, "apply", APPLY)
    check_choice(self.staleness_lr, "staleness_lr", STALENESS_LR)
    lam = real_number(self.delay_compensation, "delay_compensation")
    if not lam >= 0:  # nan too
      raise OptionError("delay_compensation", lam, "a number >= 0 (DC-ASGD's lambda; 0 is off)")
    put("delay_compensation", lam)
    put("fail", tuple(self.fail) or (NEVER,) * n)
    if len(self.fail) != n:
      raise OptionError("fail", self.fail, f"one failure tick per worker ({n})")

  @property
  def per_device(self) -> int:
    """k = N / D, the workers each device computes."""
    return self.num_workers // self.devices


def fail_ticks(fail: Mapping[int, int] | None, n: int) -> tuple[int, ...]:
  """``{worker: tick}`` as one failure tick per worker (``NEVER`` for the others).

  Raises:
    OptionError: a worker outside ``[0, n)`` or a tick that is not an int >= 0.
  """
  ticks = [NEVER] * n
  for w, t in (fail or {}).items():
    is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    if not (is_int(w) and 0 <= w < n):
      raise OptionError("fail", dict(fail), f"a dict {{worker: tick}} of workers 0..{n - 1} (num_workers={n})")
    if not (is_int(t) and t >= 0):
      raise OptionError(f"fail[{w}]", t, f"the tick (an int >= 0) from which worker {w} stops")
    ticks[int(w)] = min(int(t), NEVER)
  return tuple(ticks)


def describe(cfg: AsyncConfig, pause_prob: float, delay: Any) -> tuple[str, dict[str, Any]]:
  """The strategy's name (``async_sgd[N=8,s=2,...]``) and its ``info``."""
  tags = [f"N={cfg.num_workers}", f"apply={cfg.apply}"]
  if cfg.max_staleness is not None:
    tags.append(f"s={cfg.max_staleness}")
  if pause_prob:
    tags.append(f"pause={pause_prob:g}")
  if delay is not None:
    tags.append(delay.name)
  if cfg.staleness_lr:
    tags.append(f"lr={cfg.staleness_lr}")
  if cfg.delay_compensation:
    tags.append(f"dc={cfg.delay_compensation:g}")
  failing = {w: t for w, t in enumerate(cfg.fail) if t != NEVER}
  if failing:
    tags.append(f"fail={failing}")
  info = {"num_workers": cfg.num_workers, "max_staleness": cfg.max_staleness, "apply": cfg.apply,
          "pause_prob": pause_prob, "delay": "every_tick" if delay is None else delay.name,
          "staleness_lr": cfg.staleness_lr, "delay_compensation": cfg.delay_compensation}
  return f"async_sgd[{','.join(tags)}]", info
