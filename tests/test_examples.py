"""The examples run and reach their stated results."""
import importlib.util
import pathlib

import numpy as np
import pytest

from tests.conftest import assert_trees_all_close

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_linear_regression_equals_single_device_and_converges(capsys):
  example = load_example("linear_regression")
  params, losses = example.train(100)
  assert_trees_all_close(params, example.single_device(100), rtol=1e-5)
  out = capsys.readouterr().out
  assert "device 0: 1 -> 3, 2 -> 5" in out and "device 3: 7 -> 15, 8 -> 17" in out
  assert "epoch   100" in out and "final w" in out
  assert losses[-1] < losses[0]
  params, _ = example.train(3000, verbose=False)
  np.testing.assert_allclose(params["w"][0, 0], 2.0, atol=1e-2)
  np.testing.assert_allclose(params["b"][0], 1.0, atol=1e-2)


def test_digits_mlp_reaches_95_percent():
  example = load_example("digits_mlp")
  accuracy, loss = example.train(400, verbose=False)
  assert accuracy >= 0.95, accuracy
  assert loss < 0.3
