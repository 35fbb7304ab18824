"""Test setup: 8 emulated CPU devices, set before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import logging  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The corrupted-checkpoint tests leave orbax's failed reads behind as asyncio futures; asyncio logs them
# ("Future exception was never retrieved") when they are collected, often after pytest's summary. The
# tests check those failures themselves (as pyproject.toml's filterwarnings notes).
logging.getLogger("asyncio").setLevel(logging.CRITICAL)

# Property-based tests: the same few draws on every run ("ci", the default: derandomized, bounded, no example
# database), or many random ones with HYPOTHESIS_PROFILE=explore. Each example compiles new programs, so no
# per-example deadline.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors]
settings.register_profile("ci", derandomize=True, max_examples=8, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("explore", max_examples=60, deadline=None, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
  if len(jax.devices()) < 8:
    skip = pytest.mark.skip(reason=f"needs 8 devices, JAX has {len(jax.devices())}")
    for item in items:
      if "needs8" in item.keywords:
        item.add_marker(skip)


def assert_trees_all_close(actual, expected, *, rtol=1e-5, atol=1e-6):
  """Asserts two pytrees have the same structure and leaves equal to a relative tolerance."""
  a_leaves, a_def = jax.tree.flatten(actual)
  e_leaves, e_def = jax.tree.flatten(expected)
  assert a_def == e_def, f"tree structures differ: {a_def} vs {e_def}"
  for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=f"leaf {i}")


def single_device_reference(loss_fn, optimizer, params, batches):
  """Plain optax on one device: the independent reference every strategy must equal."""
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    import optax
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    # the loss as value=, for the transformations that need it (reduce_on_plateau); the others ignore it, but
    # for those that take extra arguments and refuse this one (sam)
    try:
      updates, opt_state = optax.with_extra_args_support(optimizer).update(grads, opt_state, params, value=loss)
    except TypeError as e:
      if "unexpected keyword argument 'value'" not in str(e):
        raise
      updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for batch in batches:
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  return params, opt_state, losses


def benchmark_module(monkeypatch, name):
  """``benchmarks/NAME.py`` loaded as a module, with benchmarks/ on ``sys.path`` for this test only (the
  scripts import their neighbours; the folder also holds names like pipeline.py)."""
  import importlib.util
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
  monkeypatch.syspath_prepend(str(root))
  spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
