"""The code's shape: tests and benchmarks that do not import each other (what both need lives in the package, or in
``tests/`` for the tests alone)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent


def _top_level_imports(path: Path) -> List[Tuple[int, str]]:
    """(line, top-level module) of every import of a script, anywhere in it (``importlib.import_module("x")``
    included), and (line, ``"sys.path: <call>"``) of every change to ``sys.path`` (how a script reaches a folder
    that is not on the path)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).startswith("sys.path."):
            found.append((node.lineno, f"sys.path: {ast.unparse(node)}"))
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return sorted(found)


def test_tests_and_benchmarks_do_not_import_each_other():
    sides = {"tests": sorted((ROOT / "tests").rglob("*.py")), "benchmarks": sorted((ROOT / "benchmarks").rglob("*.py"))}
    assert len(sides["tests"]) >= 20 and len(sides["benchmarks"]) >= 8
    modules = {side: {p.stem for p in files} for side, files in sides.items()}
    found = []
    for side, other in (("tests", "benchmarks"), ("benchmarks", "tests")):
        for path in sides[side]:
            for line, name in _top_level_imports(path):
                reaches = name.startswith("sys.path: ") and other in name.lower()
                if reaches or name in modules[other] - modules[side]:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert found == []


def test_the_cross_import_check_sees_both_kinds(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nsys.path.insert(0, str(ROOT / 'benchmarks'))\nfrom equal_latency import summarise\n"
                   "bench = importlib.import_module('equal_latency')\n")
    assert [name for _, name in _top_level_imports(bad)] == [
        "sys", "sys.path: sys.path.insert(0, str(ROOT / 'benchmarks'))", "equal_latency", "equal_latency"]
