"""What the ``resconv`` command measures and writes: per-stage figures, report.json, report.md and PNG plots.

Definitions (also written into every report):

* ``top1``: top-1 accuracy (%) on the validation split.
* ``flops``: fvcore count with resconv_plugin's op handles (one multiply-add = 1) of the model *as deployed* at
  batch 1: on a copy, gates fused (``fuse``) and every conv -> BatchNorm pair folded (``fold_batchnorms``), so every
  stage, the baseline included, is counted as the plain network it stands for.
* ``params``: parameters of that model.
* ``latency_ms``: median wall time of one forward of that model in the run's latency runtime (the one its latency
  budget is measured in: ``--latency-runtime``, default eager PyTorch; ONNX Runtime and OpenVINO run the model's
  ONNX export), at its latency batch size (``--latency-batch-size``, default 1) with its threads
  (``--latency-threads``, default the runtime's), on the run's latency device (``--latency-device``, else the
  training device; the CPU for ONNX Runtime and OpenVINO), in the run's memory format, eval mode, after a warm-up;
  all stages timed in turns at the end of the run (so a slow spell of a shared machine hits them alike). The
  report's ``latency`` records the runtime, its version, threads, batch size and device
  (:meth:`resconv_plugin.LatencyCost.as_dict`); ``latency_device`` names the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.measure.latency_cost import LatencyCost, describe_latency
from resconv_plugin.fx.surgery import gated_modules
from resconv_plugin._utils import atomic_file, format_table

__all__ = ["measure", "stage_latencies", "DEFINITIONS", "stage_table", "write_report", "format_table",
           "write_text_atomic", "latency_label", "latency_column"]

DEFINITIONS = {
    "top1": "top-1 accuracy (%) on the validation split",
    "flops": "fvcore FLOPs (1 multiply-add = 1, resconv_plugin op handles) at batch 1 of the model as deployed "
             "(gates fused, every conv-BN pair folded)",
    "params": "parameters of the model as deployed",
    "latency_ms": "median wall time of a forward of the model as deployed in the runtime, at the batch size and with "
                  "the threads recorded in latency (those of the latency budget: --latency-runtime, default eager "
                  "PyTorch; --latency-batch-size, default 1; --latency-threads) on latency_device (--latency-device, "
                  "else the training device); eval, after warm-up; stages timed in turns",
}


def latency_label(device: Union[str, torch.device, None]) -> str:
    """How tables name the device latency was timed on: ``"CPU"``, or the device (``"cuda:0"``)."""
    return "CPU" if device is None or torch.device(device).type == "cpu" else str(device)


def measure(model: nn.Module, example: torch.Tensor, *, accuracy: Optional[float] = None,
            latency_repeats: Optional[int] = None, latency_cost: Optional[LatencyCost] = None) -> Dict[str, Any]:
    """FLOPs, params and latency of ``model`` as deployed, plus the given accuracy.

    Args:
        latency_repeats: timing rounds (default 50; with ``latency_cost``: its own).
        latency_cost: the runtime, batch size and threads to time in (default: eager PyTorch on the example's
            device, at its batch size); recorded as ``latency``.
    """
    from resconv_plugin.pruning.cost import timing_cost

    if latency_cost is None and latency_repeats is None:
        latency_repeats = 50
    cost = timing_cost((example,), latency_cost, repeats=latency_repeats)
    flops = count_flops(deployed(model), example)
    latency = cost(model, example)
    return {"top1": accuracy, "flops": int(flops.total), "params": int(flops.params), "latency_ms": 1e3 * latency,
            "latency": cost.as_dict(), "gates": len(gated_modules(model))}


def stage_latencies(models: Dict[str, nn.Module], example: torch.Tensor, repeats: Optional[int] = None, *,
                    device: Union[str, torch.device, None] = None, channels_last: bool = False,
                    cost: Optional[LatencyCost] = None) -> Dict[str, float]:
    """Milliseconds per forward of each model as deployed on ``example``, timed in turns
    (:meth:`LatencyCost.compare <resconv_plugin.LatencyCost.compare>`).

    Args:
        repeats, device, channels_last: without ``cost``, time in eager PyTorch: ``repeats`` rounds (default 50),
            on ``device`` (default: the example's device; models elsewhere are timed as copies there), in
            channels-last memory format or not.
        cost: the runtime, batch size, threads, device and repeats to time with.
    """
    from resconv_plugin.pruning.cost import timing_cost

    if cost is None and repeats is None:
        repeats = 50
    cost = timing_cost((example,), cost, repeats=repeats, channels_last=channels_last, device=device)
    return {k: 1e3 * v for k, v in cost.compare(models, example).items()}


def latency_column(latency: Optional[Dict[str, Any]] = None,
                   latency_device: Union[str, torch.device, None] = None) -> str:
    """The name of a latency column: where and how it was timed, e.g. ``"CPU latency ms (onnxruntime 1.32.0, batch
    1, 2 threads)"`` (``latency``: a :meth:`~resconv_plugin.LatencyCost.as_dict` record; without one, batch 1 in
    eager PyTorch, as reports made before runtimes were recorded)."""
    if not latency:
        return f"{latency_label(latency_device)} latency ms (batch 1)"
    device = latency.get("device", latency_device)
    return f"{latency_label(device)} latency ms ({describe_latency(latency, device=False)})"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stage_table(records: List[Dict[str, Any]], markdown: bool = False,
                latency_device: Union[str, torch.device, None] = None,
                latency: Optional[Dict[str, Any]] = None) -> str:
    """The per-stage table (top-1, FLOPs, params, latency and the change against the first row; ``latency_device``
    and ``latency``: where and how latency was timed, for the column's name (:func:`latency_column`), default the
    CPU)."""
    base = records[0] if records else {}
    rows = []
    for r in records:
        rel = (lambda k: f" ({100 * (r[k] / base[k] - 1):+.1f}%)" if base.get(k) and r is not base else "")
        rows.append((r["stage"], _fmt(r.get("top1"), ".2f"), f"{r['flops'] / 1e6:.2f}M{rel('flops')}",
                     f"{r['params'] / 1e3:.1f}k{rel('params')}", f"{r['latency_ms']:.3f}{rel('latency_ms')}"))
    header = ["stage", "top-1 %", "FLOPs", "params", latency_column(latency, latency_device)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
        return "\n".join(lines)
    return format_table(header, rows)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def _plots(report: Dict[str, Any], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    trace = report.get("gamma_trace") or []
    if trace:
        names = list(trace[0]["gates"])
        removed = set(report.get("removed", []))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        updates = [t["update"] for t in trace]
        for name in names:
            values = [abs(t["gates"].get(name, float("nan"))) for t in trace]
            ax.plot(updates, values, color="tab:red" if name in removed else "tab:blue", alpha=0.7, lw=1.2)
        ax.plot([], [], color="tab:red", label="removed")
        ax.plot([], [], color="tab:blue", label="kept")
        ax.set_xlabel("sparsity-training update")
        ax.set_ylabel("|gamma|")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"Layer scaling factors during sparsity training ({len(names)} gates)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gammas.png", dpi=110)
        plt.close(fig)
        written.append("gammas.png")
    records = report["stages"]
    labels = [r["stage"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    latency = latency_column(report.get("latency"), report.get("latency_device"))
    for ax, key, title in ((axes[0], "flops", "FLOPs (M)"), (axes[1], "latency_ms", latency)):
        values = [r[key] / (1e6 if key == "flops" else 1) for r in records]
        ax.bar(labels, values, color="tab:gray")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)
    written.append("cost.png")
    acc = [(r["stage"], r["top1"]) for r in records if r.get("top1") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([a[0] for a in acc], [a[1] for a in acc], marker="o")
        for label, value in acc:
            ax.annotate(f"{value:.2f}", (label, value), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
        ax.set_ylabel("top-1 %")
        ax.set_title("Accuracy per stage")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
        plt.close(fig)
        written.append("accuracy.png")
    return written


def write_report(report: Dict[str, Any], out: Path, plots: bool = True) -> List[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(report, out) if plots else []
    report = dict(report, plots=pngs, definitions=DEFINITIONS)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    s = report.get("settings", {})
    md = [f"# resconv compress: {s.get('model')} on {s.get('data')}", "",
          stage_table(report["stages"], markdown=True, latency_device=report.get("latency_device"),
                      latency=report.get("latency")), "",
          "Figures: " + "; ".join(f"**{k}**: {v}" for k, v in DEFINITIONS.items()) + ".", ""]
    if report.get("removed"):
        md += [f"Removed ({len(report['removed'])}): " + ", ".join(f"`{n}`" for n in report["removed"]), ""]
    if report.get("removal"):
        md += [f"Removal: {report['removal']}", ""]
    for r in report.get("restarts") or []:
        md += [f"Restarted: {r['stage']} at update {r['update']}, mean loss {r['loss']:.4g} > {r['threshold']:.4g} "
               f"(divergence guard), lr {r['lr']:.4g} -> {r['new_lr']:.4g}"
               + (f", warm-up epochs {r['warmup_epochs']} -> {r['new_warmup_epochs']}"
                  if r.get("new_warmup_epochs") != r.get("warmup_epochs") else ""), ""]
    md += [f"![{p}]({p})" for p in pngs]
    md += ["", f"Command: `{report.get('command', '')}`", "", f"Environment: {report.get('environment', {})}", ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    return [out / "report.json", out / "report.md"] + [out / p for p in pngs]
