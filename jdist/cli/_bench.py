"""``jdist bench``: runs the scripts under benchmarks/ and streams their tables."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Sequence


def benchmarks_dir() -> pathlib.Path:
  import jdist

  return pathlib.Path(jdist.__file__).resolve().parents[1] / "benchmarks"


def bench(names: Sequence[str], *, quick: bool = False) -> int:
  root = benchmarks_dir()
  if not root.is_dir():
    raise FileNotFoundError(f"No benchmarks/ directory next to the jdist package ({root}); run from a source "
                            f"checkout (pip install -e .).")
  available = sorted(p.stem for p in root.glob("*.py") if not p.stem.startswith("_"))
  unknown = [n for n in names if n not in available]
  if unknown:
    raise ValueError(f"Unknown benchmark {unknown[0]!r}. Available: {', '.join(available)}.")
  status = 0
  for name in names or available:
    print(f"== benchmarks/{name}.py", flush=True)
    cmd = [sys.executable, str(root / f"{name}.py")] + (["--quick"] if quick else [])
    # the scripts import jdist: from this source tree, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root.parent), os.environ.get("PYTHONPATH")])))
    rc = subprocess.call(cmd, env=env)
    status = max(status, 128 - rc if rc < 0 else rc)  # killed by signal k: 128 + k, as a shell reports it
  return status
