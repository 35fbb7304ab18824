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


def stdlib_text(seq_len: int = 64, *, max_bytes: int | None = None, test_fraction: float = 0.05,
                test_examples: int = 256) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Byte-level text that ships with every Python: the standard library's own source files.

  The top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` (168 files, 4.7 MB on CPython 3.11), read
  in sorted order and joined: the same bytes on every machine with the same Python version. The last
  ``test_fraction`` of the bytes is held out; both parts are cut into windows of ``seq_len + 1`` tokens (the
  inputs and the shifted next-token targets) every ``seq_len`` bytes.

  Args:
    seq_len: the model's context length S.
    max_bytes: use only the first this many bytes (None: all of them).
    test_fraction: the share of the bytes held out for evaluation, in (0, 1).
    test_examples: how many held-out windows the test set keeps (the first ones).

  Returns:
    ``(train, test)``, each ``{"tokens": int32[n, seq_len + 1]}`` with tokens in [0, 256).
  """
  import pathlib
  import sysconfig

  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
  text = b"\n".join(f.read_bytes() for f in files)[:max_bytes]
  data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
  cut = int(len(data) * (1 - test_fraction))

  def windows(part: np.ndarray, limit: int | None = None) -> np.ndarray:
    n = (len(part) - 1) // seq_len
    if n < 1:
      raise ValueError(f"{len(part)} bytes of text cannot fill one window of {seq_len + 1}; raise max_bytes or "
                       f"lower seq_len.")
    starts = np.arange(min(n, limit or n)) * seq_len
    return part[starts[:, None] + np.arange(seq_len + 1)]

  return {"tokens": windows(data[:cut])}, {"tokens": windows(data[cut:], test_examples)}


def linear_regression_split() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``linear_regression()`` as ``(train, test)``: the same 8 points (the article trains and measures on them)."""
  data = linear_regression()
  return data, data


# the data sets a config names (``[data] name = "text"``): callables returning (train, test)
BUNDLED = {"digits": digits, "linear_regression": linear_regression_split, "text": stdlib_text}
