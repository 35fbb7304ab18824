import jax
import numpy as np
import pytest

import jdist


def test_make_mesh_orders_axes_and_fills_minus_one():
  mesh = jdist.make_mesh(data=2, model=-1)
  assert tuple(mesh.axis_names) == ("data", "model")
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert mesh.devices.size == 8
  mesh = jdist.make_mesh(data=4, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 4}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])


def test_mesh_bigger_than_devices():
  with pytest.raises(ValueError, match=r"needs 16 devices but only 8 are available .*emulate_devices\(16\)"):
    jdist.make_mesh(data=16)


def test_sizes_must_multiply_to_device_count():
  with pytest.raises(ValueError, match=r"multiply to 6, but 8 devices were given"):
    jdist.make_mesh(data=2, model=3)
  with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
    jdist.make_mesh(data=3, model=-1)
  with pytest.raises(ValueError, match="Only one mesh axis may have size -1"):
    jdist.make_mesh(data=-1, model=-1)
  with pytest.raises(ValueError, match="size 0"):
    jdist.make_mesh(data=0)
  device = jax.devices()[0]
  with pytest.raises(ValueError, match=r"got the same device more than once \(TFRT_CPU_0\)|got the same device more"):
    jdist.make_mesh(data=2, devices=[device, device])
  with pytest.raises(ValueError, match="at least one axis"):
    jdist.make_mesh()


def test_another_mesh_s_devices_and_bad_meshes_or_axes():
  # another mesh's device array is flattened in its order; a missing mesh or an axis named twice is an error
  grid = jdist.make_mesh(a=2, b=4)
  mesh = jdist.make_mesh(data=-1, devices=grid.devices)
  assert list(mesh.devices.flat) == list(grid.devices.flat)
  import optax

  from jdist.models import mlp
  for make in (jdist.data_parallel, jdist.local_sgd, jdist.sharded, jdist.model_parallel.fsdp):
    with pytest.raises(TypeError,
                       match="mesh must be a jax.sharding.Mesh, e.g. jdist.make_mesh\\(data=-1\\), got NoneType"):
      make(mlp.loss, optax.sgd(0.1), None)
  with pytest.raises(ValueError, match=r"\('a', 'a'\) names a mesh axis more than once"):
    jdist.data_parallel(mlp.loss, optax.sgd(0.1), grid, axis=("a", "a"))


def test_emulate_devices_after_start():
  assert len(jdist.emulate_devices(8)) >= 8  # already have 8: fine
  with pytest.raises(RuntimeError, match=r"already started with 8 CPU device\(s\), so 64 cannot be emulated"):
    jdist.emulate_devices(64)
  with pytest.raises(ValueError):
    jdist.emulate_devices(0)
  assert len(jdist.emulate_devices(np.int64(8))) >= 8  # numpy ints, as make_mesh takes them


def test_replicate_makes_fresh_buffers():
  x = jax.numpy.arange(4.0)
  r = jdist.replicate(x, jdist.make_mesh(data=8))
  pointers = {s.data.unsafe_buffer_pointer() for s in r.addressable_shards}
  assert x.unsafe_buffer_pointer() not in pointers
  assert r.sharding.is_fully_replicated and len(r.sharding.device_set) == 8
