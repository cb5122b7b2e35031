"""The README's Python examples run as written; so does examples/convert_and_fuse.py (the `resconv demo` is tested
in test_cli.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_fashion_mnist

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "fashion-mnist" in code:
        require_fashion_mnist()
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index}", "exec"), {})


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


def test_convert_and_fuse_example_runs():
    script = README.parent / "examples" / "convert_and_fuse.py"
    out = subprocess.run([sys.executable, str(script), "--model", "resnet18", "--size", "64"], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    diff = float(re.search(r"relative ([0-9.e+-]+)\)", out.stdout).group(1))
    assert diff < 1e-5
    assert re.search(r"^fused .* 0\s+0$", out.stdout, flags=re.M)
