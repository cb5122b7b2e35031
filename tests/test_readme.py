"""The README's Python examples run as written (tests/markdown_blocks.py has the convention; the docs pages' blocks
are run by test_docs.py); so does examples/convert_and_fuse.py (the `resconv demo` is tested in test_cli.py)."""

import os
import re
import subprocess
import sys

from markdown_blocks import ROOT, python_blocks, run_page

README = ROOT / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    assert run_page(README, tmp_path, monkeypatch) >= 1


def test_readme_has_an_example_and_both_quickstart_commands():
    assert python_blocks(README)
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250


def test_convert_and_fuse_example_runs():
    script = ROOT / "examples" / "convert_and_fuse.py"
    out = subprocess.run([sys.executable, str(script), "--model", "resnet18", "--size", "64"], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    diff = float(re.search(r"relative ([0-9.e+-]+)\)", out.stdout).group(1))
    assert diff < 1e-5
    assert re.search(r"^fused .* 0\s+0$", out.stdout, flags=re.M)
