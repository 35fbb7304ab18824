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


def test_allreduce_walkthrough(capsys):
  example = load_example("allreduce_walkthrough")
  ours = example.show_ring()
  assert (ours == [10, 100, 1000, 10000]).all()
  out = capsys.readouterr().out
  assert "after reduce-scatter step 3:" in out and "after all-gather step 3:" in out
  results = example.train_with_each_algorithm(epochs=20)
  for algorithm, values in results.items():
    np.testing.assert_allclose(values, results["psum"], rtol=1e-6, err_msg=algorithm)


def test_local_sgd_example(tmp_path):
  example = load_example("local_sgd")
  results = example.run(steps=48, out=str(tmp_path), verbose=True)
  dp = results["sync data parallel"]["bytes_per_step"]
  np.testing.assert_allclose(results["local SGD H=4"]["bytes_per_step"], dp / 4, rtol=0.01)
  np.testing.assert_allclose(results["local SGD H=16"]["bytes_per_step"], dp / 16, rtol=0.01)
  assert all(r["accuracy"] > 0.8 for r in results.values())
  assert (tmp_path / "local_sgd.png").exists()


def test_gpt_sharded_example_equals_single_device():
  example = load_example("gpt_sharded")
  losses, diff = example.train(12, verbose=False)
  assert losses[-1] < losses[0]
  assert diff < 1e-5


def test_pipeline_example(capsys):
  example = load_example("pipeline")
  example.show_schedules()
  assert "bubble: 0.273" in capsys.readouterr().out
  losses, diff = example.train(6, verbose=False)
  assert losses[-1] < losses[0] and diff < 1e-5


@pytest.mark.parametrize("name", ["gpt_sharded", "pipeline"])
def test_examples_exit_non_zero_when_the_equivalence_fails(name, monkeypatch, capsys):
  example = load_example(name)
  monkeypatch.setattr(example, "train", lambda *args, **kwargs: ([3.0, 2.0], 1e-3))
  with pytest.raises(SystemExit, match=r"FAILED: .* 1\.00e-03 > 0\.0001"):
    example.main(["--steps", "2"])
  monkeypatch.setattr(example, "train", lambda *args, **kwargs: ([3.0, 2.0], 1e-6))
  example.main(["--steps", "2"])  # within the tolerance: returns normally


def test_linear_regression_example_exits_non_zero_when_the_equivalence_fails(monkeypatch, capsys):
  example = load_example("linear_regression")
  monkeypatch.setattr(example, "single_device", lambda epochs, **kwargs: {"w": np.zeros((1, 1)), "b": np.zeros(1)})
  with pytest.raises(SystemExit, match="FAILED: data parallel differs from one device"):
    example.main(["--epochs", "3"])


def test_allreduce_walkthrough_exits_non_zero_when_an_algorithm_differs(monkeypatch, capsys):
  example = load_example("allreduce_walkthrough")
  monkeypatch.setattr(example, "show_ring", lambda: None)
  monkeypatch.setattr(example, "train_with_each_algorithm",
                      lambda epochs: {"psum": np.ones(2), "ring": np.ones(2) * 1.01})
  with pytest.raises(SystemExit, match="FAILED: ring trained to"):
    example.main([])


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_explains_its_options(script):
  """``--help`` exits 0 without running the example, and every option has help text."""
  import os
  import re
  import subprocess
  import sys

  root = EXAMPLES.parent
  done = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.startswith("usage:"), done.stdout[:500]
  lines = done.stdout.splitlines()
  silent = []
  for i, line in enumerate(lines):
    if re.match(r"^  -", line) and not line.strip().startswith("-h, --help"):
      # "  --steps STEPS   Adam steps ..." or the help on the next, deeper-indented line
      has_help = len(re.split(r"\s{2,}", line.strip())) > 1 or (
          i + 1 < len(lines) and re.match(r"^ {6,}\S", lines[i + 1]) is not None)
      if not has_help:
        silent.append(line.strip())
  assert not silent, f"{script}: options without help text: {silent}"
