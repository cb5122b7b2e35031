"""Latency at equal FLOPs: depth pruning (LayerPruner) against torch-pruning channel pruning, side by side.

For each architecture and FLOPs budget:
* depth: ``resconv_plugin.convert`` (layer- or block-level gates), gates set to seeded uniform random values (they
  stand in for trained ones: which layers go depends on them, the FLOPs removed do not), ``LayerPruner(
  flops_reduction=budget).step()``, ``fuse``.
* channel: the same unpruned model, torch-pruning ``MetaPruner`` with ``MagnitudeImportance(p=2)``,
  ``global_pruning=True``, ``pruning_ratio`` found by bisection so that its FLOPs are within 2% of the depth-pruned
  model's; once with torch-pruning's default rounding (``channel``), once with ``round_to=8`` (``channel_r8``,
  kernel-friendly widths: the fair comparison; on the 16/32/64-wide CIFAR nets no ratio may land within 2% then:
  the closest within 5% is kept and its mismatch reported).
* every model, the baseline included, then gets ``fold_batchnorms`` (deployed form); FLOPs are resconv_plugin's
  fvcore count (1 multiply-add = 1) at batch 1.

Figures:
* latency: median wall time of one forward (eval, ``torch.no_grad``), the 4 models of a setting timed in turns
  (``interleaved_latencies``: rotation order, warm-up 3, median of --repeats), at batch 1 and 32, NCHW and
  channels-last, on this CPU with torch's default threads. Weights are random: latency does not depend on them.
* ratio: depth latency / channel latency from the same interleaved run (< 1: depth pruning is faster).
* peak memory: growth of resident memory over the first batch-32 NCHW forward in a fresh process per model (peak
  mark VmHWM reset through /proc/self/clear_refs just before, minus VmRSS before): activations and workspaces.

Usage: python benchmarks/latency_equal_flops.py [--quick] [--archs ...] [--budgets 0.4 0.6] [--repeats 30]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch
import torch_pruning as tp

import resconv_plugin
from resconv_plugin import deployed, interleaved_latencies
from resconv_plugin.integrations.torch_pruning import channel_pruner
from common import RESULTS, environment, write_results

ARCHS = {
    "cifar_resnet56": {"size": 32, "level": "layer", "num_classes": 10},
    "resnet18": {"size": 224, "level": "layer", "num_classes": 1000},
    "efficientnet_b0": {"size": 224, "level": "block", "num_classes": 1000},
}
VARIANTS = ("baseline", "depth", "channel", "channel_r8")


def depth_pruned(base: torch.nn.Module, x: torch.Tensor, level: str, budget: float, seed: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    resconv_plugin.convert(model, x, level=level)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in resconv_plugin.gated_modules(model).values():
            gate.gamma.fill_(torch.rand((), generator=g).item())
    try:
        pruner = resconv_plugin.LayerPruner(model, x, flops_reduction=budget)
    except ValueError as exc:  # e.g. efficientnet_b0's gated blocks hold 54% of its FLOPs: take what is reachable
        saved, total = resconv_plugin.LayerPruner(model, x, gate_ratio=0.0).savings("flops")
        reachable = sum(saved.values()) / total
        print(f"note: {exc}; using {reachable - 0.02:.3f}", flush=True)
        pruner = resconv_plugin.LayerPruner(model, x, flops_reduction=reachable - 0.02)
    pruner.step()
    return deployed(model)


def channel_pruned(base: torch.nn.Module, x: torch.Tensor, ratio: float, round_to) -> torch.nn.Module:
    model = copy.deepcopy(base)
    kwargs = {"round_to": round_to} if round_to else {}
    pruner = channel_pruner(model, x, tp.pruner.MetaPruner, importance=tp.importance.MagnitudeImportance(p=2),
                            pruning_ratio=ratio, global_pruning=True, **kwargs)
    pruner.step()
    resconv_plugin.deploy.fold_batchnorms(model)
    return model.eval()


def match_flops(base, x, target: float, round_to, tolerance: float = 0.02, iterations: int = 16,
                fallback: float = 0.05):
    """Bisection on pruning_ratio until the channel-pruned FLOPs are within ``tolerance`` of ``target``; global
    pruning maps ratio to FLOPs in steps (a layer's channels go in groups), so a fine scan around the best ratio
    follows when bisection alone does not land. With coarse rounding no ratio may land within ``tolerance``: the
    closest model within ``fallback`` is kept (its FLOPs are in the table, ``flops_mismatch`` in the JSON)."""
    lo, hi, best = 0.0, 0.95, None

    def trial(ratio):
        nonlocal best
        model = channel_pruned(base, x, ratio, round_to)
        flops = resconv_plugin.count_flops(model, x).total
        if best is None or abs(flops - target) < abs(best[2] - target):
            best = (model, ratio, flops)
        return flops

    for _ in range(iterations):
        ratio = (lo + hi) / 2
        flops = trial(ratio)
        if abs(flops - target) <= tolerance * target / 2:
            break
        lo, hi = (ratio, hi) if flops > target else (lo, ratio)
    centre = best[1]
    for step in range(1, 21):
        if abs(best[2] - target) <= tolerance * target:
            break
        for ratio in (centre - 0.0025 * step, centre + 0.0025 * step):
            if 0.0 < ratio < 0.99:
                trial(ratio)
    model, ratio, flops = best
    if abs(flops - target) > fallback * target:
        raise RuntimeError(f"could not match {target:.4g} FLOPs within {fallback:.0%} (closest {flops:.4g})")
    if abs(flops - target) > tolerance * target:
        print(f"note: round_to={round_to}: closest channel-pruned model is {flops / target - 1:+.1%} off the "
              f"depth model's FLOPs (channel groups of {round_to} are coarse here); kept and flagged", flush=True)
    return model, ratio, flops


def latencies(models: dict, size: int, channels: int, batch: int, channels_last: bool, repeats: int) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    ready = {k: copy.deepcopy(m).to(memory_format=fmt) for k, m in models.items()}
    fns = {k: (lambda m=m: m(x)) for k, m in ready.items()}
    return {k: 1e3 * v for k, v in interleaved_latencies(fns, repeats=repeats).items()}


_PEAK = """
import sys, torch, resconv_plugin
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
m = resconv_plugin.load(sys.argv[1]).eval()
x = torch.randn(32, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[3]))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM)
before = status("VmRSS")
with torch.no_grad():
    m(x)
print(status("VmHWM") - before)
"""


def peak_memory_mb(model, size: int, channels: int, folder: Path, name: str) -> float:
    path = folder / f"{name}.safetensors"
    resconv_plugin.save(model, path)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(channels), str(size)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def depth_of(model) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet56 and efficientnet_b0 at 64 px, one "
                                                              "budget, 10 repeats")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, help="input side for the ImageNet models (default 224)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="latency_equal_flops")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.budgets, args.repeats, args.size = ["cifar_resnet56", "efficientnet_b0"], [0.4], 10, 64
        args.name += "_quick"
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    rows, records = [], []
    folder = Path(tempfile.mkdtemp())
    for arch in args.archs:
        spec = ARCHS[arch]
        size = spec["size"] if arch.startswith("cifar") or not args.size else args.size
        base = timm.create_model(arch, num_classes=spec["num_classes"]).eval()
        x = torch.randn(1, 3, size, size)
        deployed_base = copy.deepcopy(base)
        resconv_plugin.deploy.fold_batchnorms(deployed_base)
        base_flops = resconv_plugin.count_flops(deployed_base, x)
        for budget in args.budgets:
            depth = depth_pruned(base, x, spec["level"], budget, args.seed)
            target = resconv_plugin.count_flops(depth, x).total
            models = {"baseline": deployed_base, "depth": depth}
            ratios = {}
            for variant, round_to in (("channel", None), ("channel_r8", 8)):
                models[variant], ratios[variant], _ = match_flops(base, x, target, round_to)
            figures = {k: {"flops": resconv_plugin.count_flops(m, x).total, "params": resconv_plugin.count_params(m),
                           "convs": depth_of(m)} for k, m in models.items()}
            for k in ("channel", "channel_r8"):
                figures[k]["flops_mismatch"] = figures[k]["flops"] / target - 1
            for batch in args.batches:
                for layout in ("nchw", "channels_last"):
                    lat = latencies(models, size, 3, batch, layout == "channels_last", args.repeats)
                    for k in models:
                        figures[k][f"ms_b{batch}_{layout}"] = lat[k]
            for k, m in models.items():
                figures[k]["peak_mb_b32"] = peak_memory_mb(m, size, 3, folder, f"{arch}_{budget}_{k}")
            record = {"arch": arch, "input": size, "level": spec["level"], "budget": budget,
                      "channel_pruning_ratio": ratios, "models": figures,
                      "ratio_depth_over_channel": {}, "ratio_depth_over_channel_r8": {}}
            for key in [k for k in figures["depth"] if k.startswith("ms_")]:
                record["ratio_depth_over_channel"][key] = figures["depth"][key] / figures["channel"][key]
                record["ratio_depth_over_channel_r8"][key] = figures["depth"][key] / figures["channel_r8"][key]
            records.append(record)
            for k in VARIANTS:
                f = figures[k]
                rows.append([arch, f"{budget:.0%}", k, f"{f['flops'] / 1e6:.1f}",
                             f"{1 - f['flops'] / base_flops.total:.1%}", f"{f['params'] / 1e6:.2f}", f["convs"]]
                            + [f"{f[key]:.2f}" for key in sorted(k2 for k2 in f if k2.startswith("ms_"))]
                            + [f"{f['peak_mb_b32']:.0f}"])
            print(json.dumps({"arch": arch, "budget": budget, "depth/channel_r8": {
                k: round(v, 3) for k, v in record["ratio_depth_over_channel_r8"].items()}}), flush=True)
            with open(RESULTS / f"{args.name}.partial.jsonl", "a") as f:  # nothing lost if a later setting fails
                f.write(json.dumps(record) + "\n")
    keys = sorted(k for k in records[0]["ratio_depth_over_channel"])
    summary = {
        "benchmark": args.name,
        "median_ratio_depth_over_channel": {k: statistics.median(r["ratio_depth_over_channel"][k] for r in records)
                                            for k in keys},
        "median_ratio_depth_over_channel_r8": {
            k: statistics.median(r["ratio_depth_over_channel_r8"][k] for r in records) for k in keys},
        "settings": len(records),
    }
    header = ["arch", "FLOPs removed (target)", "model", "MFLOPs", "FLOPs removed", "params (M)", "convs"] + \
        [k.replace("ms_", "ms ").replace("_", " ") for k in keys] + ["peak MB (b32)"]
    ratio_rows = [[r["arch"], f"{r['budget']:.0%}", f"vs {v}", "", "", "", ""]
                  + [f"{r[f'ratio_depth_over_{v}'][k]:.2f}" for k in keys] + [""]
                  for r in records for v in ("channel", "channel_r8")]
    notes = ("ms = median milliseconds per forward (eval, no_grad), the 4 models of a setting timed in turns; "
             "'vs channel' rows: depth latency / channel latency from that same run (< 1: depth is faster). "
             "FLOPs: resconv_plugin fvcore count of the deployed model (BN folded) at batch 1. Weights are random "
             "(seeded); depth pruning removes the layers of smallest random gate until the budget is met; channel "
             "pruning: torch-pruning MetaPruner, MagnitudeImportance(p=2), global, pruning_ratio bisected (then scanned) to the "
             "depth model's FLOPs within 2% (where round_to=8 is too coarse for that, the closest within 5%: see "
             "the MFLOPs column). peak MB: peak resident-memory growth over the first batch-32 NCHW "
             f"forward in a fresh process. Seed {args.seed}, repeats {args.repeats}.")
    write_results(args.name, {"environment": environment(), "records": records, "summary": summary,
                              "args": vars(args)}, header, rows + ratio_rows, notes)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
