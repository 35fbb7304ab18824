"""Small data sets that ship with packages, so examples and tests run offline."""
from __future__ import annotations

import numpy as np


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), split train / test.

  Returns:
    ``(train, test)``, each ``{"x": f32[n, 64] in [0, 1], "y": int32[n]}``.
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("The digits data set needs scikit-learn: pip install 'jdist[dev]' or scikit-learn.") from e
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def linear_regression() -> dict[str, np.ndarray]:
  """The seed article's problem: x = 1..8, y = 2x + 1, as ``{"x": f32[8, 1], "y": f32[8, 1]}``."""
  x = np.arange(1, 9, dtype=np.float32)[:, None]
  return {"x": x, "y": 2 * x + 1}


def zen_of_python_tokens(seq_len: int, *, num_examples: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
  """Byte-level windows of "The Zen of Python" (shipped with Python as ``this``), for the GPT examples.

  Returns ``{"tokens": int32[num_examples, seq_len + 1]}``: random windows of the text's UTF-8 bytes
  (vocabulary 256), each with one extra token for the shifted next-token target.
  """
  import codecs
  import contextlib
  import io

  with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
    import this
  text = codecs.decode(this.s, "rot13").encode()
  data = np.frombuffer(text * (1 + (seq_len + 1) // len(text)), dtype=np.uint8).astype(np.int32)
  starts = np.random.default_rng(seed).integers(0, len(text), size=num_examples)
  data = np.concatenate([data, data])
  return {"tokens": np.stack([data[s:s + seq_len + 1] for s in starts])}
