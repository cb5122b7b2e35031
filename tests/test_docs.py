"""The docs site builds with ``mkdocs build --strict`` (a broken link, anchor, nav entry or API reference fails),
its Python blocks run (the convention is in tests/markdown_blocks.py), and the repository paths the README, the docs
and the benchmark indexes cite exist."""

import os
import re
import subprocess
import sys

import pytest

from markdown_blocks import ROOT, python_blocks, run_page

DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))
RUNNABLE = [p for p in PAGES if python_blocks(p)]

# Markdown files whose cited paths are checked: the README, the docs, the benchmark indexes.
CITING = [ROOT / "README.md", *PAGES, *sorted((ROOT / "benchmarks").glob("*README.md")),
          *sorted((ROOT / "benchmarks" / "explorations").glob("README.md"))]
TOP = ("benchmarks/", "examples/", "tests/", "resconv_plugin/", "integrations/", "docs/")
# Bare result-file names (cited in the benchmark pages without their folder) live somewhere under one of these.
RESULT_DIRS = (ROOT / "benchmarks" / "results", ROOT / "benchmarks" / "baselines")
RESULT_NAME = re.compile(r"^[a-z0-9_]+(\.md|\.json|\.jsonl|\.png|_rows/|_retimes/)$")
RUN_OUTPUTS = {"report.md", "report.json", "gammas.png", "cost.png", "accuracy.png",  # what a run writes
               "gpu_check.json", "gpu_check.md"}  # what benchmarks/gpu_check.sh writes on a GPU (none has run it yet)


def test_mkdocs_build_strict(tmp_path):
    """A missing mkdocs is a failure, not a skip: `make test` installs the docs extra."""
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (make test installs it)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "site" / "reference" / "resconv_plugin" / "index.html").is_file()


def test_docs_have_runnable_examples():
    assert len(RUNNABLE) >= 5


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(DOCS)) for p in RUNNABLE])
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    assert run_page(page, tmp_path, monkeypatch) >= 1


def _anchors(page):
    """The heading anchors of a Markdown page, as MkDocs' toc extension makes them."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", page.read_text(), flags=re.M)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h.replace("`", "")).strip().lower()) for h in headings}


def _cited(path):
    text = path.read_text()
    spans = re.findall(r"`([^`\s]+)`", text)
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    return spans, links


@pytest.mark.parametrize("page", CITING, ids=[str(p.relative_to(ROOT)) for p in CITING])
def test_cited_paths_exist(page):
    missing = []
    spans, links = _cited(page)
    for token in spans:
        token = token.rstrip(".,;:")
        if any(c in token for c in "*<>{}[]"):
            continue
        if token.startswith(TOP):
            if token.rsplit("/", 1)[-1] not in RUN_OUTPUTS and not (ROOT / token.split("#")[0].split(":")[0]).exists():
                missing.append(token)
        elif "/" in token and (page.parent / token.split("/")[0]).is_dir():  # relative to the page's folder
            if not (page.parent / token).exists():
                missing.append(token)
        elif RESULT_NAME.match(token) and token not in RUN_OUTPUTS:
            if not any(True for d in RESULT_DIRS for _ in d.rglob(token.rstrip("/"))):
                missing.append(token)
    if page.parent != DOCS and DOCS not in page.parents:  # the docs' own links are checked by mkdocs
        for link in links:
            target, _, anchor = link.partition("#")
            target = page.parent / target
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
                missing.append(link)
    assert not missing, f"{page.relative_to(ROOT)} cites paths that do not exist: {missing}"
