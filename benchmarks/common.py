"""Shared by the benchmark scripts: environment description and atomic result writing (JSON + markdown)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from resconv_plugin.workflow.report import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> Dict[str, object]:
    """Versions and machine, recorded with every result."""
    import fvcore  # noqa: F401  (version lookup below)
    import importlib.metadata as md

    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "fvcore": md.version("fvcore"), "resconv_plugin": md.version("resconv-plugin"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "commit": commit,
        "command": shlex.join(["python", os.path.relpath(Path(sys.argv[0]).resolve(), RESULTS.parent.parent)]
                             + sys.argv[1:]),
    }



def resumed_row(path: Path, make: Callable[[], dict]) -> dict:
    """The finished row kept at ``path``, else ``make()``, written there atomically: an interrupted benchmark run
    again resumes at the first row it has not finished."""
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    write_json(path, row)
    return row


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON at ``path``, written atomically (a finished row or a summary: never half a file)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_results(name: str, payload: Dict[str, object], header: Sequence[str], rows: List[Sequence[object]],
                  notes: str = "", sections: str = "") -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a table with the command and environment, then
    ``sections``: further markdown)."""
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    env = payload["environment"]
    lines = [f"# {name}", "", f"Command: `{env['command']}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", notes, "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "command"), ""]
    if sections:
        lines += [sections]
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines))


def curve_at(points, latency):
    """Top-1 at ``latency`` on the curve through ``points`` [(latency_rel, top1)] plus the baseline (1.0, base):
    linear in between; None below the curve's lowest latency."""
    points = sorted(points)
    if not points or latency < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= latency <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (latency - x0) / (x1 - x0)
    return points[-1][1]
