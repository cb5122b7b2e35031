"""What the ``resconv`` command measures and writes: per-stage figures, report.json, report.md and PNG plots.

Definitions (also written into every report):

* ``top1``: top-1 accuracy (%) on the validation split.
* ``flops``: fvcore count with resconv_plugin's op handles (one multiply-add = 1) of the model *as deployed* at
  batch 1: on a copy, gates fused (``fuse``) and every conv -> BatchNorm pair folded (``fold_batchnorms``), so every
  stage, the baseline included, is counted as the plain network it stands for.
* ``params``: parameters of that model.
* ``latency_ms``: median wall time of a batch-1 forward of that model on the run's latency device (the one its
  latency budget is measured on: ``--latency-device``, else the training device; on the CPU with
  ``torch.get_num_threads()`` threads), in the run's memory format, eval mode, after a warm-up; all stages timed in
  turns at the end of the run (so a slow spell of a shared machine hits them alike). The report's
  ``latency_device`` names the device.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.measure.latency import median_latency
from resconv_plugin.fx.surgery import gated_modules
from resconv_plugin._utils import atomic_file, format_table

__all__ = ["measure", "stage_latencies", "DEFINITIONS", "stage_table", "write_report", "format_table",
           "write_text_atomic", "latency_label"]

DEFINITIONS = {
    "top1": "top-1 accuracy (%) on the validation split",
    "flops": "fvcore FLOPs (1 multiply-add = 1, resconv_plugin op handles) at batch 1 of the model as deployed "
             "(gates fused, every conv-BN pair folded)",
    "params": "parameters of the model as deployed",
    "latency_ms": "median wall time of a batch-1 forward of the model as deployed on latency_device (the device "
                  "of the latency budget: --latency-device, else the training device; eval, after warm-up; stages "
                  "timed in turns)",
}


def latency_label(device: Union[str, torch.device, None]) -> str:
    """How tables name the device latency was timed on: ``"CPU"``, or the device (``"cuda:0"``)."""
    return "CPU" if device is None or torch.device(device).type == "cpu" else str(device)


def measure(model: nn.Module, example: torch.Tensor, *, accuracy: Optional[float] = None,
            latency_repeats: int = 50) -> Dict[str, Any]:
    """FLOPs, params and latency (on the example's device) of ``model`` as deployed, plus the given accuracy."""
    was_training = model.training
    plain = deployed(model)
    flops = count_flops(plain, example)
    with torch.no_grad():
        latency = median_latency(lambda: plain(example), repeats=latency_repeats, device=example.device)
    model.train(was_training)
    return {"top1": accuracy, "flops": int(flops.total), "params": int(flops.params), "latency_ms": 1e3 * latency,
            "gates": len(gated_modules(model))}


def stage_latencies(models: Dict[str, nn.Module], example: torch.Tensor, repeats: int = 50, *,
                    device: Union[str, torch.device, None] = None,
                    channels_last: bool = False) -> Dict[str, float]:
    """Milliseconds per forward of each model on ``example``, timed in turns (``interleaved_latencies``).

    Args:
        device: where to time them (default: the example's device); models elsewhere are timed as copies there.
        channels_last: time models and input in channels-last memory format.
    """
    from resconv_plugin.measure.latency import interleaved_latencies

    device = torch.device(device) if device is not None else example.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (example.contiguous(memory_format=fmt) if example.dim() == 4 else example).to(device)

    def placed(model: nn.Module) -> nn.Module:
        here = all(t.device == device for t in model.parameters()) and not channels_last
        return model if here else copy.deepcopy(model).to(device, memory_format=fmt)

    fns = {k: (lambda m=placed(m): m(x)) for k, m in models.items()}
    return {k: 1e3 * v for k, v in interleaved_latencies(fns, repeats=repeats, device=device).items()}


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stage_table(records: List[Dict[str, Any]], markdown: bool = False,
                latency_device: Union[str, torch.device, None] = None) -> str:
    """The per-stage table (top-1, FLOPs, params, latency and the change against the first row; ``latency_device``:
    where latency was timed, for the column's name, default the CPU)."""
    base = records[0] if records else {}
    rows = []
    for r in records:
        rel = (lambda k: f" ({100 * (r[k] / base[k] - 1):+.1f}%)" if base.get(k) and r is not base else "")
        rows.append((r["stage"], _fmt(r.get("top1"), ".2f"), f"{r['flops'] / 1e6:.2f}M{rel('flops')}",
                     f"{r['params'] / 1e3:.1f}k{rel('params')}", f"{r['latency_ms']:.3f}{rel('latency_ms')}"))
    header = ["stage", "top-1 %", "FLOPs", "params", f"{latency_label(latency_device)} latency ms (batch 1)"]
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
    latency = f"{latency_label(report.get('latency_device'))} latency, batch 1 (ms)"
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
          stage_table(report["stages"], markdown=True, latency_device=report.get("latency_device")), "",
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
