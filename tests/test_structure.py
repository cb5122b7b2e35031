"""The code's shape: no import cycles among the package's modules, and tests and benchmarks that do not import each
other (what both need lives in the package, or in ``tests/`` for the tests alone)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "resconv_plugin"


def _module_files() -> Dict[str, Path]:
    """Module name -> file, for the package and the integrations installed inside it."""
    files = {}
    for folder, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "integrations", f"{PACKAGE}.integrations")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def _imports(tree: ast.AST) -> Iterator[Tuple[ast.AST, bool]]:
    """Every import statement of a module with whether it runs at import time (False: inside a function); those
    under ``if TYPE_CHECKING:`` never run and are left out."""

    def walk(node: ast.AST, in_function: bool) -> Iterator[Tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (item for n in child.orelse for item in walk(ast.Module([n], []), in_function))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, not in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.Lambda)))

    return walk(tree, False)


def _import_graph() -> Dict[str, Dict[str, bool]]:
    """module -> {imported package module: imported at import time}. ``from a import b`` counts as an import of
    ``a.b`` when that is a module, else of ``a``; a package's ``__init__`` that Python runs on the way to a submodule
    is not an edge of its own (every module would import its parents)."""
    files = _module_files()
    graph: Dict[str, Dict[str, bool]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = graph.setdefault(module, {})
        for node, at_import in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges[target] = edges.get(target, False) or at_import
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_is_read():
    graph = _import_graph()
    assert graph["resconv_plugin.workflow.pipeline"]["resconv_plugin.workflow.config"] is True
    assert graph["resconv_plugin.workflow.config"]["resconv_plugin.pruning.pruner"] is False  # inside budget()
    assert graph["resconv_plugin.integrations.timm"]  # the integrations count as the package's modules
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_at_import_time():
    graph = _import_graph()
    assert _cycles({m: {t for t, now in edges.items() if now} for m, edges in graph.items()}) == []


def test_no_import_cycles_through_function_level_imports_either():
    """An import inside a function that closes a circle hides a layering mistake: what both need belongs below
    both."""
    assert _cycles({m: set(edges) for m, edges in _import_graph().items()}) == []


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
