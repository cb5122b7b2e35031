"""Tool speed: seconds to convert and to fuse timm models on this CPU.

Metric definitions (median over --repeats runs, each on a freshly created model; model creation is not timed):
* convert: ``resconv_plugin.convert(model, x)`` with x of shape (1, 3, S, S): one eval forward with hooks, torch.fx
  trace, module swaps.
* fuse: ``resconv_plugin.fuse(model.eval())`` (deep copy + folding every ResConv).
* total: convert + fuse measured together on the same run.

Usage: python benchmarks/convert_fuse_speed.py [--quick] [--models resnet50 ...] [--size 224] [--repeats 15]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import timm
import torch

import resconv_plugin
from _common import environment, write_results


def time_once(name: str, size: int) -> tuple:
    model = timm.create_model(name, num_classes=1000).eval()
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    resconv_plugin.convert(model, x)
    t1 = time.perf_counter()
    resconv_plugin.fuse(model)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="resnet50 only, 3 repeats, results not saved")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = ["resnet50"], 3
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    results = {}
    for name in args.models:
        time_once(name, args.size)  # warm-up: first-call costs (imports, allocator, fx) are not the steady state
        runs = [time_once(name, args.size) for _ in range(args.repeats)]
        convert_s, fuse_s, total_s = (statistics.median(r[i] for r in runs) for i in range(3))
        results[name] = {"convert_s": round(convert_s, 4), "fuse_s": round(fuse_s, 4), "total_s": round(total_s, 4),
                         "total_max_s": round(max(r[2] for r in runs), 4), "repeats": args.repeats}
        print(f"{name}: convert {convert_s:.3f}s  fuse {fuse_s:.3f}s  total {total_s:.3f}s "
              f"(max {max(r[2] for r in runs):.3f}s over {args.repeats})", flush=True)

    payload = {"benchmark": "convert_fuse_speed", "input": [1, 3, args.size, args.size], "seed": 0,
               "results": results, "environment": environment()}
    if not args.quick:
        rows = [(n, r["convert_s"], r["fuse_s"], r["total_s"], r["total_max_s"]) for n, r in results.items()]
        write_results("convert_fuse_speed", payload,
                      ["model", "convert (s)", "fuse (s)", "convert + fuse (s)", "worst run (s)"], rows,
                      notes=f"Median of {args.repeats} runs after one warm-up, input 1x3x{args.size}x{args.size}, "
                            "fresh model per run (creation not timed).")
    print(json.dumps({"benchmark": "convert_fuse_speed", **{f"{n}_total_s": r["total_s"] for n, r in results.items()}}))


if __name__ == "__main__":
    main()
