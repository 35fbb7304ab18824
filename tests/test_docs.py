"""Every Python block in README.md and docs/ runs, so the docs cannot go stale.

Each ```python block is a self-contained program, run in a fresh process with 8 emulated CPU devices in an
empty directory. A block that cannot run alone (a signature, a fragment of a larger program) is written as
``text`` or another language instead; there is no way to skip a python block.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^( *)```python[^\n]*\n(.*?)^\1```", re.S | re.M)  # also indented (in a list)


def _blocks():
  for page in PAGES:
    text = page.read_text()
    for match in BLOCK.finditer(text):
      line = text[:match.start()].count("\n") + 1
      yield pytest.param(textwrap.dedent(match.group(2)), id=f"{page.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_python_block_runs(code, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, f"the block failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
