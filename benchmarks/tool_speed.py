"""Tool speed: seconds for each step of the plugin on timm models, on this CPU.

Steps, timed one after the other on a freshly created model per run (creation not timed), input (1, 3, S, S):
* convert: ``resconv_plugin.convert(model, x)`` (one forward with hooks, torch.fx trace, module swaps).
* count_flops: ``resconv_plugin.count_flops(model, x)`` of the converted model (fvcore trace + our op handles).
* prune: ``LayerPruner(model, x, gate_ratio=0.5)`` (half of the gates: a FLOPs budget would not fit every
  model, layer-level gates can remove at most 37% of resnet50's FLOPs and 6.8% of efficientnet_b0's) and ``step()``
  (removal surgery + the output-change check), on random gates.
* fuse: ``resconv_plugin.fuse(model.eval())`` (deep copy + folding every ResConv).
* save / load: ``resconv_plugin.save`` and ``resconv_plugin.load`` (rebuild by replaying the recipe + weights).
Median of --repeats runs after one warm-up run.

Usage: python benchmarks/tool_speed.py [--quick] [--models resnet50 ...] [--size 224] [--repeats 10]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

import resconv_plugin
from common import environment, write_results

STEPS = ("convert", "count_flops", "prune", "fuse", "save", "load")


def time_once(name: str, size: int, folder: Path) -> dict:
    model = timm.create_model(name, num_classes=1000).eval()
    x = torch.randn(1, 3, size, size)
    g = torch.Generator().manual_seed(0)
    times = {}
    t = time.perf_counter()
    resconv_plugin.convert(model, x)
    times["convert"] = time.perf_counter() - t
    t = time.perf_counter()
    resconv_plugin.count_flops(model, x)
    times["count_flops"] = time.perf_counter() - t
    with torch.no_grad():
        for gate in resconv_plugin.gated_modules(model).values():
            gate.gamma.fill_(torch.rand((), generator=g).item())
    t = time.perf_counter()
    resconv_plugin.LayerPruner(model, x, gate_ratio=0.5).step()
    times["prune"] = time.perf_counter() - t
    t = time.perf_counter()
    fused = resconv_plugin.fuse(model.eval())
    times["fuse"] = time.perf_counter() - t
    t = time.perf_counter()
    resconv_plugin.save(fused, folder / "m.safetensors")
    times["save"] = time.perf_counter() - t
    t = time.perf_counter()
    resconv_plugin.load(folder / "m.safetensors")
    times["load"] = time.perf_counter() - t
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="resnet50 only, 3 repeats (results in *_quick files)")
    args = parser.parse_args()
    name = "tool_speed"
    if args.quick:
        args.models, args.repeats, name = ["resnet50"], 3, "tool_speed_quick"
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp())
    results = {}
    for model in args.models:
        time_once(model, args.size, folder)  # warm-up: first-call costs (imports, fx, fvcore JIT) excluded
        runs = [time_once(model, args.size, folder) for _ in range(args.repeats)]
        results[model] = {s: statistics.median(r[s] for r in runs) for s in STEPS}
        results[model]["total"] = statistics.median(sum(r.values()) for r in runs)
        print(model, " ".join(f"{s} {v:.3f}s" for s, v in results[model].items()), flush=True)
    payload = {"benchmark": name, "input": [1, 3, args.size, args.size], "seed": 0, "repeats": args.repeats,
               "results": results, "environment": environment()}
    rows = [[m] + [f"{r[s]:.3f}" for s in STEPS + ("total",)] for m, r in results.items()]
    write_results(name, payload, ["model"] + [f"{s} (s)" for s in STEPS] + ["total (s)"], rows,
                  notes=f"Median of {args.repeats} runs after one warm-up, input 1x3x{args.size}x{args.size}, a fresh "
                        "model per run (creation not timed); prune = LayerPruner(gate_ratio=0.5) + step() on "
                        "random gates.")
    print(json.dumps({"benchmark": name, **{f"{m}_{s}_s": round(r[s], 4) for m, r in results.items()
                                            for s in STEPS + ("total",)}}))


if __name__ == "__main__":
    main()
