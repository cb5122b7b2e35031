"""The Python blocks of the README and of the docs pages, and how the test suite runs them.

Convention: every fenced block opened by a line starting with ```` ```python ```` at the start of a line is run, in
the order of the page, all blocks of a page in one namespace (a page may build on its earlier blocks), from a fresh
temporary directory. A block meant only to be read is marked by the line ``<!-- no-test -->`` right before its fence
(an HTML comment: invisible on GitHub and on the docs site). A page whose runnable blocks mention ``fashion-mnist``
needs that dataset (skipped without it, a failure in CI; ``tests/helpers.require_fashion_mnist``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Tuple

from helpers import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
NO_TEST = "<!-- no-test -->"
_FENCE = re.compile(r"^```python\b")


def python_blocks(path: Path) -> List[Tuple[int, str]]:
    """``[(line of the first code line, code)]`` of the runnable ```` ```python ```` blocks of ``path``, in order."""
    lines = Path(path).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not _FENCE.match(lines[i]):
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: a ```python block that is never closed")
        if not (i > 0 and lines[i - 1].strip() == NO_TEST):
            blocks.append((i + 2, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def run_page(path: Path, tmp_path: Path, monkeypatch) -> int:
    """Run the runnable blocks of ``path`` in order in one namespace, from ``tmp_path``; returns how many ran.

    Tracebacks name the page and its line numbers."""
    blocks = python_blocks(path)
    if any("fashion-mnist" in code for _, code in blocks):
        require_fashion_mnist()
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"markdown:{path.name}"}
    name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, name, "exec"), namespace)
    return len(blocks)
