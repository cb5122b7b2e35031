"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], str(README), "exec"), {})


def test_demo_runs(tmp_path):
    import subprocess
    import sys

    script = README.parent / "examples" / "convert_and_fuse.py"
    out = subprocess.run([sys.executable, str(script), "--model", "resnet18", "--size", "64"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    diff = float(re.search(r"relative ([0-9.e+-]+)\)", out.stdout).group(1))
    assert diff < 1e-5
    assert re.search(r"^fused .* 0\s+0$", out.stdout, flags=re.M)
