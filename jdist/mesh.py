"""Device meshes: build them, emulate devices on CPU, place batches and replicated values."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdist._types import PyTree


def emulate_devices(n: int) -> list[jax.Device]:
  """Arranges for JAX's CPU backend to expose ``n`` devices.

  Must be called before JAX runs its first operation (the backend reads the setting once). If JAX has
  already started with at least ``n`` CPU devices this is a no-op.

  Args:
    n: number of CPU devices wanted, >= 1.

  Returns:
    The CPU devices (at least ``n``).

  Raises:
    ValueError: if ``n`` < 1.
    RuntimeError: if JAX already started with fewer than ``n`` CPU devices.

  Example:
    >>> import jdist
    >>> devices = jdist.emulate_devices(8)  # doctest: +SKIP
  """
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"emulate_devices expects a positive int number of devices, got {n!r}.")
  n = int(n)
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # the backend has started; check what it has below
  have = jax.devices("cpu")
  if len(have) < n:
    raise RuntimeError(
        f"JAX already started with {len(have)} CPU device(s), so {n} cannot be emulated any more. "
        f"Call jdist.emulate_devices({n}) right after `import jax`, before any JAX operation, or set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python.")
  return have


def make_mesh(*, devices: Sequence[jax.Device] | None = None, **axes: int) -> Mesh:
  """Builds a named device mesh, e.g. ``make_mesh(data=2, model=4)``.

  Axes are laid out in the order given. Their sizes must multiply to the number of devices; one size
  may be -1, meaning "whatever is left". Every axis is ``AxisType.Auto`` so that both ``jax.shard_map``
  and GSPMD-sharded ``jax.jit`` accept arrays placed on it (see docs/pitfalls.md, pitfall 2).

  Args:
    devices: the devices to use, by default ``jax.devices()``.
    **axes: axis name -> size (a positive int, or -1 for one axis).

  Returns:
    A ``jax.sharding.Mesh``.

  Raises:
    ValueError: no axes, a bad size, sizes that do not multiply to the device count, a mesh larger
      than the devices available, or a device given twice.

  Example:
    >>> mesh = make_mesh(data=-1)  # every device on one "data" axis
  """
  if not axes:
    raise ValueError("make_mesh needs at least one axis, e.g. make_mesh(data=8) or make_mesh(data=-1).")
  if isinstance(devices, np.ndarray):  # e.g. another mesh's devices: its layout is not kept
    devices = devices.ravel().tolist()
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh got an empty device list.")
  if len(set(devices)) != len(devices):
    seen: set = set()
    repeated = sorted({str(d) for d in devices if d in seen or seen.add(d)})
    raise ValueError(f"make_mesh got the same device more than once ({', '.join(repeated)}); a mesh needs "
                     f"{len(devices)} distinct devices. Pass each device once, e.g. devices=jax.devices()[:n].")
  names = tuple(axes)
  sizes = list(axes.values())
  for name, size in axes.items():
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {name!r} has size {size!r}; expected a positive int or -1 (fill the rest).")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"Only one mesh axis may have size -1, got {len(free)}: {axes}.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if len(devices) % known:
      raise ValueError(
          f"Mesh axes {axes}: the fixed sizes multiply to {known}, which does not divide the "
          f"{len(devices)} devices, so -1 cannot fill the rest. Choose sizes that divide {len(devices)}.")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} needs {total} devices but only {len(devices)} are available "
        f"({devices[0].platform}). Use smaller axes, or on CPU emulate more devices with "
        f"jdist.emulate_devices({total}) before JAX starts.")
  if total != len(devices):
    raise ValueError(
        f"Mesh axis sizes {dict(zip(names, sizes))} multiply to {total}, but {len(devices)} devices were "
        f"given. Make the sizes multiply to {len(devices)} (one of them may be -1), or pass "
        f"devices=jax.devices()[:{total}].")
  return jax.make_mesh(tuple(int(s) for s in sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
  """The number of devices along ``axis`` (a name or a tuple of names) of ``mesh``."""
  return math.prod(mesh.shape[a] for a in as_axes(axis))


def as_axes(axis: str | Sequence[str]) -> tuple[str, ...]:
  """Normalises an axis argument to a tuple of names."""
  return (axis,) if isinstance(axis, str) else tuple(axis)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Copies ``tree`` onto every device of ``mesh`` (fresh buffers, so donating them is safe).

  ``jax.device_put(..., may_alias=False)`` has been seen to reuse the source buffer for the shard on the
  source device, so a donated step would delete the caller's array; an explicit copy comes first.
  """
  fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return jax.device_put(fresh, NamedSharding(mesh, P()))
