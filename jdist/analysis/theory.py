"""Textbook communication figures, to compare with what ``comm_report`` reads from compiled programs."""
from __future__ import annotations

import math

from jdist._checks import check_positive_int
from jdist.errors import OptionError

ALGORITHMS = ("halving_doubling", "hierarchical", "psum", "ring", "tree")


def allreduce_bytes(n_bytes: float, num_devices: int, algorithm: str = "ring", *, inner: int | None = None) -> float:
  """Bytes each device sends to all-reduce a payload of ``n_bytes`` over ``num_devices``.

  ``ring`` and ``psum`` (bandwidth-optimal): 2(N-1)/N n, the lower bound. ``halving_doubling``: the same
  for a power of two N; otherwise 2(p-1)/p n plus the fold's n on the devices that fold (reported for
  those, the busiest). ``tree``: ceil(log2 N) n on the busiest device (the root sends the whole payload
  in every broadcast round and nothing in the reduce; the others send once in the reduce and less in
  the broadcast). ``hierarchical``
  with ``inner`` devices per group: 2(Ni-1)/Ni n + 2(No-1)/(No Ni) n.
  """
  n = check_positive_int(num_devices, "num_devices")
  if algorithm not in ALGORITHMS:
    raise OptionError("algorithm", algorithm, f"one of {list(ALGORITHMS)}")
  if algorithm == "hierarchical" and (inner is None or inner < 1 or n % inner):
    raise OptionError("inner", inner, f"the devices per group of hierarchical, dividing num_devices={n}")
  if n == 1:
    return 0.0
  if algorithm == "halving_doubling":
    p = 1 << (n.bit_length() - 1)
    return 2 * (p - 1) / p * n_bytes + (n_bytes if p != n else 0.0)
  if algorithm == "tree":
    return math.ceil(math.log2(n)) * n_bytes
  if algorithm == "hierarchical":
    outer = n // inner
    return 2 * (inner - 1) / inner * n_bytes + 2 * (outer - 1) / (outer * inner) * n_bytes
  return 2 * (n - 1) / n * n_bytes  # ring and psum


def ring_minimum_bytes(n_bytes: float, num_devices: int) -> float:
  """The least any all-reduce can send per device: 2(N-1)/N of the payload."""
  return allreduce_bytes(n_bytes, num_devices, "ring")
