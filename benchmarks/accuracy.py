"""Accuracy against FLOPs and latency on real data (Fashion-MNIST): depth pruning (ResConv + LayerPruner) against
torch-pruning's network slimming (BNScalePruner) at equal FLOPs and equal epoch budget, and both combined.

Per architecture (``cifar_resnet20`` fast, ``cifar_resnet56``), all from one baseline:
* baseline: --base-epochs of SGD (lr 0.1, cosine) on the training subset.
* depth@b: convert, --sparsity-epochs with ``LayerPruner(flops_reduction=b)`` (proximal L1 + budget cap), remove,
  freeze the surviving gates, --finetune-epochs (the unfused model: its BatchNorms still train), fuse.
* slim@b: --sparsity-epochs with ``BNScalePruner(reg=--slim-reg)`` (L1 on BN scales, torch-pruning), prune channels
  (``BNScaleImportance``, global) with the pruning_ratio bisected so FLOPs match depth@b within 2%,
  --finetune-epochs: the same epoch budget.
* combined@b: both regularisers in the same sparsity epochs, depth removes 60% of the budget, then channel pruning
  (BN-scale importance) of the unfused model down to the FLOPs of depth@b, --finetune-epochs, fuse.
Fine-tuning always happens before fusion: a fused network has no BatchNorm left in its fused layers, and fine-tuning
it (first version of this script) lost 15 points.
* depth@r, no fine-tuning: low budgets r with sparsity training only: what removal costs by itself.
Figures: top-1 on the full Fashion-MNIST test set (10,000 images); FLOPs / params of the deployed model (every BN
folded; resconv_plugin fvcore count, batch 1, 1x28x28); CPU latency = median ms of a batch-1 forward, all models of
an architecture timed in turns at the end (--repeats rounds). Seed --seed. Training: SGD momentum 0.9, weight decay
5e-4, batch 128, cosine per update; sparsity / fine-tuning lr 0.02.

Finished rows are kept under --cache/rows: the same command resumes an interrupted run at the next row.

Usage: python benchmarks/accuracy.py [--quick] [--archs cifar_resnet20 cifar_resnet56] [--train-subset 20000]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import timm
import torch
import torch_pruning as tp

import resconv_plugin
from resconv_plugin import deployed, interleaved_latencies
from resconv_plugin.data import build_datasets
from resconv_plugin.integrations.torch_pruning import channel_pruner
from resconv_plugin.workflow import StageSettings, evaluate, finetune, remove_pruned, sparsity_steps, train_stage
from common import RESULTS, environment, write_results

EXAMPLE = torch.zeros(1, 1, 28, 28)


def train(model, data, name, epochs, lr, seed, pruner=None, regularizers=()):
    if epochs:
        settings = StageSettings(name=name, epochs=epochs, lr=lr, seed=seed, progress=False)
        train_stage(model, data, settings, pruner=pruner, regularizers=regularizers)
    return model.eval()


def slim_to(model, target_flops, tolerance=0.02, iterations=16):
    """Channel-prune (BN-scale importance, global) a copy of ``model`` to ``target_flops`` (deployed) by bisection."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(iterations):
        ratio = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        channel_pruner(candidate, EXAMPLE, tp.pruner.BNScalePruner, pruning_ratio=ratio, global_pruning=True).step()
        flops = resconv_plugin.count_flops(deployed(candidate), EXAMPLE).total
        if best is None or abs(flops - target_flops) < abs(best[1] - target_flops):
            best = (candidate, flops, ratio)
        if abs(flops - target_flops) <= tolerance * target_flops / 2:
            break
        lo, hi = (ratio, hi) if flops > target_flops else (lo, ratio)
    if abs(best[1] - target_flops) > 0.05 * target_flops:
        raise RuntimeError(f"could not match {target_flops:.4g} FLOPs within 5%: closest {best[1]:.4g}")
    if abs(best[1] - target_flops) > tolerance * target_flops:  # coarse channel groups: kept, the table shows it
        print(f"note: closest channel pruning is {best[1] / target_flops - 1:+.1%} off the target FLOPs", flush=True)
    return best[0], best[2]


def depth_sparsity(base, data, flops_reduction, name, args, slimming=False):
    """Convert a copy of ``base``, sparsity-train it with the LayerPruner's budget (and torch-pruning's BN-scale L1
    when ``slimming``), remove the selected layers; returns the model (unfused, eval), the pruner, the removed names."""
    model = copy.deepcopy(base)
    resconv_plugin.convert(model, EXAMPLE)
    pruner = resconv_plugin.LayerPruner(model, EXAMPLE, flops_reduction=flops_reduction,
                                        sparsity_steps=sparsity_steps(data, args.sparsity_epochs, 128))
    regularizers = [channel_pruner(model, EXAMPLE, tp.pruner.BNScalePruner, reg=args.slim_reg)] if slimming else []
    train(model, data, name, args.sparsity_epochs, 0.02, args.seed + 1, pruner=pruner, regularizers=regularizers)
    removed = remove_pruned(model, EXAMPLE, pruner).removed
    return model.eval(), pruner, removed


def finetune_then_fuse(model, data, name, args):
    """The workflow's rule: fine-tune the unfused model with the gates frozen, then fuse."""
    if args.finetune_epochs:
        finetune(model, data, StageSettings(name=name, epochs=args.finetune_epochs, lr=0.02, seed=args.seed + 2,
                                            progress=False))
    return resconv_plugin.fuse(model.eval())


def depth_run(base, data, budget, args, finetune=True):
    model, pruner, removed = depth_sparsity(base, data, budget, f"depth@{budget}", args)
    model = finetune_then_fuse(model, data, f"depth@{budget} ft", args) if finetune else resconv_plugin.fuse(model)
    return model, {"removed": len(removed), "removal_change": pruner.last_step.max_abs_change}


def slim_run(base, data, target, args):
    model = copy.deepcopy(base)
    slimming = channel_pruner(model, EXAMPLE, tp.pruner.BNScalePruner, reg=args.slim_reg)
    train(model, data, "slim", args.sparsity_epochs, 0.02, args.seed + 1, regularizers=[slimming])
    model, ratio = slim_to(model, target)
    train(model, data, "slim ft", args.finetune_epochs, 0.02, args.seed + 2)
    return model, {"channel_pruning_ratio": ratio}


def combined_run(base, data, budget, target, args):
    """Both regularisers in one sparsity phase; depth removal (60% of the budget), then channel pruning of the
    still-unfused model down to ``target`` FLOPs, fine-tuning, fusion."""
    model, _, removed = depth_sparsity(base, data, 0.6 * budget, "combined", args, slimming=True)
    model, ratio = slim_to(model, target)
    model = finetune_then_fuse(model, data, "combined ft", args)
    return model, {"removed": len(removed), "channel_pruning_ratio": ratio, "depth_share": 0.6}


def interpolate(points, x):
    """Piecewise-linear y at ``x`` over ``points`` [(x, y)]; None outside their x range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def equal_latency(records, methods=("depth", "slim", "combined")):
    """For every pruned point of a method: the top-1 each other method reaches at the same measured latency,
    read off that method's accuracy-latency curve (its points plus the unpruned baseline, linear in between).
    None where the point is faster than every point of the other method (no curve to read there)."""
    base = next(r for r in records if r["method"] == "baseline")
    curves = {m: [(base["latency_ms"], base["top1"])] + [(r["latency_ms"], r["top1"]) for r in records
                                                         if r["method"] == m] for m in methods}
    out = []
    for r in records:
        if r["method"] not in methods:
            continue
        for other in methods:
            if other == r["method"] or len(curves[other]) < 2:
                continue
            at = interpolate(curves[other], r["latency_ms"])
            out.append({"row": r["row"], "latency_ms": round(r["latency_ms"], 4), "top1": r["top1"], "vs": other,
                        "other_top1_at_equal_latency": None if at is None else round(at, 2),
                        "advantage_pt": None if at is None else round(r["top1"] - at, 2)})
    return out


def plot(records, arch, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"baseline": ("k", "*"), "depth": ("tab:red", "o"), "slim": ("tab:blue", "s"),
              "combined": ("tab:purple", "D"), "depth (no fine-tuning)": ("tab:orange", "^")}
    for method, (color, marker) in styles.items():
        pts = sorted((r["latency_ms"], r["top1"], r["label"]) for r in records if r["method"] == method)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=method,
                linestyle="-" if len(pts) > 1 else "none")
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("CPU latency, batch 1 (ms, median, timed in turns)")
    ax.set_ylabel("top-1 % (Fashion-MNIST test)")
    ax.set_title(f"{arch}: accuracy against measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_arch(arch, data, args):
    torch.manual_seed(args.seed)
    cache = Path(args.cache) / f"{arch}_s{args.seed}_n{len(data)}_e{args.base_epochs}.pt"
    base = timm.create_model(arch, num_classes=10, in_chans=1)
    if cache.exists():
        base.load_state_dict(torch.load(cache))
        print(f"{arch}: baseline from {cache}", flush=True)
    else:
        train(base, data, f"{arch} baseline", args.base_epochs, 0.1, args.seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(base.state_dict(), cache)
    models = {"baseline": (base, "baseline", "", {})}
    rows = Path(args.cache) / "rows" / (f"{arch}_s{args.seed}_n{len(data)}_e{args.base_epochs}-{args.sparsity_epochs}"
                                        f"-{args.finetune_epochs}_reg{args.slim_reg}")

    def row(key, make):
        """Each finished row's model is kept on disk (whole-module pickle: pruned shapes), so an interrupted run
        resumes at the next row with the same command."""
        path = rows / f"{key}.pt"
        if path.exists():
            print(f"{arch} {key}: from {path}", flush=True)
            return torch.load(path, weights_only=False)
        start = time.time()
        model, info = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((model, info), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        print(f"{arch} {key}: {time.time() - start:.0f}s", flush=True)
        return model, info

    for budget in args.budgets:
        depth, info = row(f"depth@{budget}", lambda: depth_run(base, data, budget, args))
        target = resconv_plugin.count_flops(deployed(depth), EXAMPLE).total
        models[f"depth@{budget}"] = (depth, "depth", f"{budget:.0%}", info)
        if "slim" in args.methods:
            slim, sinfo = row(f"slim@{budget}", lambda: slim_run(base, data, target, args))
            models[f"slim@{budget}"] = (slim, "slim", f"{budget:.0%}", sinfo)
        if "combined" in args.methods:
            combined, cinfo = row(f"combined@{budget}", lambda: combined_run(base, data, budget, target, args))
            models[f"combined@{budget}"] = (combined, "combined", f"{budget:.0%}", cinfo)
    for rate in args.no_finetune:
        model, info = row(f"depth@{rate}_noft", lambda: depth_run(base, data, rate, args, finetune=False))
        models[f"depth@{rate} no-ft"] = (model, "depth (no fine-tuning)", f"{rate:.0%}", info)
    plain = {k: deployed(m) for k, (m, *_rest) in models.items()}
    lat = interleaved_latencies({k: (lambda m=m: m(EXAMPLE)) for k, m in plain.items()}, repeats=args.repeats)
    base_top1 = evaluate(base, data)
    records = []
    for key, (model, method, label, info) in models.items():
        flops = resconv_plugin.count_flops(plain[key], EXAMPLE)
        top1 = evaluate(model, data)
        records.append({"arch": arch, "row": key, "method": method, "label": label, "top1": top1,
                        "top1_change": top1 - base_top1, "flops": flops.total, "params": flops.params,
                        "latency_ms": 1e3 * lat[key], **info})
    base_rec = records[0]
    for r in records:
        r["flops_reduction"] = 1 - r["flops"] / base_rec["flops"]
        r["latency_ratio"] = r["latency_ms"] / base_rec["latency_ms"]
        print(json.dumps(r), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--sparsity-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.65])
    parser.add_argument("--no-finetune", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--slim-reg", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=["depth", "slim", "combined"],
                        help="rows per budget (depth always runs: it sets the FLOPs target)")
    parser.add_argument("--name", default="accuracy", help="results file name")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="runs/bench_cache", help="baselines are cached here")
    parser.add_argument("--quick", action="store_true", help="cifar_resnet20, 2048 images, 1 epoch per stage, "
                                                              "one budget")
    args = parser.parse_args()
    name = args.name
    if args.quick:
        args.archs, args.train_subset, args.base_epochs, args.sparsity_epochs, args.finetune_epochs = \
            ["cifar_resnet20"], 2048, 1, 1, 1
        args.budgets, args.no_finetune, args.repeats, name = [0.5], [0.2], 10, "accuracy_quick"
    warnings.filterwarnings("ignore")
    data = build_datasets("fashion-mnist", train_subset=args.train_subset, seed=args.seed)
    records = []
    for arch in args.archs:
        arch_records = run_arch(arch, data, args)
        plot(arch_records, arch, RESULTS / f"{name}_{arch}.png")
        records += arch_records
    verdicts = {}
    for arch in args.archs:
        rs = {r["row"]: r for r in records if r["arch"] == arch}
        for budget in args.budgets:
            d = rs[f"depth@{budget}"]
            verdict = verdicts[f"{arch}@{budget}"] = {
                "depth_top1_change": round(d["top1_change"], 2),
                "depth_flops_reduction": round(d["flops_reduction"], 3),
                "paper_claim_60pct_within_0.3pt": d["flops_reduction"] >= 0.6 and d["top1_change"] >= -0.3}
            for other in ("slim", "combined"):
                if f"{other}@{budget}" in rs:
                    o = rs[f"{other}@{budget}"]
                    verdict[f"{other}_top1_change"] = round(o["top1_change"], 2)
                    verdict[f"latency_depth_over_{other}"] = round(d["latency_ms"] / o["latency_ms"], 3)
    comparisons = {arch: equal_latency([r for r in records if r["arch"] == arch]) for arch in args.archs}
    summary = {"benchmark": name, "verdicts": verdicts, "equal_latency": comparisons}
    header = ["arch", "row", "top-1 %", "change (pt)", "MFLOPs", "FLOPs removed", "params (k)",
              "CPU ms (b1)", "latency vs baseline"]
    rows = [[r["arch"], r["row"], f"{r['top1']:.2f}", f"{r['top1_change']:+.2f}", f"{r['flops'] / 1e6:.2f}",
             f"{r['flops_reduction']:.1%}", f"{r['params'] / 1e3:.1f}", f"{r['latency_ms']:.3f}",
             f"{r['latency_ratio']:.2f}"] for r in records]
    lines = ["## Equal latency", "",
             "Top-1 of each pruned point against the top-1 another method reaches at the same measured latency, read "
             "off that method's accuracy-latency curve (its points plus the baseline, linear in between; '-' where "
             "the point is faster than everything the other method produced). Advantage > 0: the row's method is "
             "more accurate at equal latency.", "",
             "| arch | row | CPU ms | top-1 % | vs | other's top-1 at this latency | advantage (pt) |",
             "|---|---|---|---|---|---|---|"]
    for arch, comps in comparisons.items():
        lines += [f"| {arch} | {c['row']} | {c['latency_ms']:.3f} | {c['top1']:.2f} | {c['vs']} | "
                  + ("- | - |" if c["advantage_pt"] is None else
                     f"{c['other_top1_at_equal_latency']:.2f} | {c['advantage_pt']:+.2f} |") for c in comps]
    write_results(name, {"environment": environment(), "args": vars(args), "records": records, "summary": summary},
                  header, rows, notes=__doc__.split("Finished rows")[0].strip().replace("\n", " ")
                  + f" Plots: {', '.join(f'{name}_{a}.png' for a in args.archs)}.", sections="\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
