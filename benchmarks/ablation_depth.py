"""Which layers to remove: importance criterion x distillation x gate level, on real data, from one trained baseline.

Every row starts from the committed baseline ``benchmarks/baselines/cifar_resnet20_fmnist.safetensors`` (full
Fashion-MNIST, see benchmarks/baselines/README.md) and runs the same schedule as ``benchmarks/accuracy.py``:
* convert (``--level layer``: a ResConv on every eligible conv, 16 in cifar_resnet20; ``block``: a gate on every
  residual block with an identity shortcut, 7);
* sparsity training, ``--sparsity-epochs`` on ``--train-subset`` images, SGD lr 0.02 cosine, with
  ``LayerPruner(flops_reduction=budget, importance=criterion, sparsity_steps=...)``, the library's defaults
  otherwise (the set is chosen up front from the baseline for removal / taylor, re-ranked by |gamma| every step
  for magnitude; the budget cap anneals it to exactly 0 by 75% of the phase); calibration batch: 256 training
  images with their labels;
* removal (exact: the removed gates are 0), gates frozen, ``--finetune-epochs`` of fine-tuning (lr 0.02 cosine),
  fusion;
* distillation on: both phases train on ``0.5 * CE + 0.5 * T^2 KL(teacher || student)``, T = 4, teacher = the
  baseline.
Criteria: ``magnitude`` (|gamma|, the paper's), ``removal`` (iterative removal: the loss increase on the calibration
batch when the gate is set to 0, re-measured after each choice), ``taylor`` (|gamma dL/dgamma|; chosen up front from
one calibration batch). Low-rate rows (``--low-rates``; layer gates, ``--low-rate-levels layer block`` adds block
gates) stop after removal: the paper's "no retraining". Control rows (``b0-layer-none-kd{off,on}``): the same
convert and both training phases with no pruner (no L1, nothing removed): what the schedule itself costs or gains
against the baseline, the floor under every other row. ``--lr`` runs rows at another peak learning rate (their key
says it: ``...-lr0.005-s0``).

Figures: top-1 on the full 10,000-image test set after sparsity training (= after the exact removal, no
fine-tuning) and after fine-tuning + fusion; FLOPs of the deployed model (fvcore, resconv_plugin handles, batch 1);
CPU latency: median of ``--repeats`` batch-1 forwards of the deployed row model and the deployed baseline, timed in
turns right after the row finished (``latency_rel`` = row / baseline); the latency table's prediction for the removed
set (``LayerPruner(latency_reduction=...)``'s table, measured once on the deployed baseline, batch 1) against that
measurement.

``--arch`` runs the same grid from another committed baseline (``benchmarks/baselines/<arch>_fmnist.safetensors``,
trained by ``benchmarks/baselines/train.py --arch <arch>``), e.g. ``--arch resnet18`` for timm's ResNet-18 (block
gates on its 5 identity-shortcut BasicBlocks, layer gates on its 13 eligible convs); its results are
``ablation_depth_<arch>.*``.

Finished rows are written one JSON file each under benchmarks/results/ablation_depth_rows/ (``ablation_depth_<arch>_rows``
for another ``--arch``; commit them): the same command skips them, so an interrupted run resumes at the next row, in
a later session too. ``--rows`` picks rows by key (e.g. ``--rows 'b0.5-layer-*'``).

Usage: python benchmarks/ablation_depth.py [--quick] [--arch cifar_resnet20] [--rows PATTERN ...] [--seed 0] [--report]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import time
import warnings
from pathlib import Path

import torch

import resconv_plugin
from resconv_plugin.data import build_datasets, calibration_batch
from resconv_plugin.workflow import StageSettings, evaluate, finetune, remove_pruned, sparsity_steps, train_stage
from common import RESULTS, environment, write_json, write_results

EXAMPLE = torch.zeros(1, 1, 28, 28)
BASELINES = Path(__file__).resolve().parent / "baselines"
DEFAULT_ARCH = "cifar_resnet20"
CRITERIA = {"magnitude": "magnitude", "removal": "removal-iterative", "taylor": "taylor"}
DEFAULT_LR = 0.02  # both phases; ``--lr`` runs rows at another one (key part ``lr<value>``)
CONTROL = "none"  # the criterion of the control rows (budget 0: no pruner, no regulariser, nothing removed)


def row_keys(budgets, low_rates, seed, low_rate_levels=("layer",)):
    """Every row, in the order they run (the decisive 50% layer rows first)."""
    keys = []
    for budget in budgets:
        for level in ("layer", "block"):
            for distill in ("off", "on"):
                for criterion in CRITERIA:
                    keys.append(f"b{budget}-{level}-{criterion}-kd{distill}-s{seed}")
    for rate in low_rates:
        for level in low_rate_levels:
            for distill in ("off", "on"):
                for criterion in CRITERIA:
                    keys.append(f"b{rate}-{level}-{criterion}-kd{distill}-noft-s{seed}")
    for distill in ("off", "on"):  # controls: the same schedule, nothing removed
        keys.append(f"b0-layer-{CONTROL}-kd{distill}-s{seed}")
    return keys


def with_lr(key, lr):
    """The row key at learning rate ``lr``: unchanged at the default, else ``lr<value>`` before the seed."""
    if lr == DEFAULT_LR:
        return key
    head, seed = key.rsplit("-", 1)
    return f"{head}-lr{lr:g}-{seed}"


def parse_key(key):
    parts = key.split("-")
    return {"budget": float(parts[0][1:]), "level": parts[1], "criterion": parts[2], "distill": parts[3] == "kdon",
            "finetune": "noft" not in parts, "seed": int(parts[-1][1:]),
            "lr": next((float(p[2:]) for p in parts if p.startswith("lr")), DEFAULT_LR)}


def settings(name, epochs, seed, teacher, lr):
    """SGD at the row's peak lr, cosine (timm), batch 128; distillation weight 0.5 when there is a teacher."""
    return StageSettings(name=name, epochs=epochs, lr=lr, seed=seed, progress=False,
                         distill_alpha=0.5 if teacher is not None else 0.0)


def run_row(key, base, data, calib, args):
    spec = parse_key(key)
    model = copy.deepcopy(base)
    resconv_plugin.convert(model, EXAMPLE, level=spec["level"])
    steps = sparsity_steps(data, args.sparsity_epochs, 128)
    start = time.time()
    pruner = None
    if spec["criterion"] != CONTROL:
        pruner = resconv_plugin.LayerPruner(model, EXAMPLE, importance=CRITERIA[spec["criterion"]],
                                            flops_reduction=spec["budget"], sparsity_steps=steps,
                                            calibration_inputs=calib[0], calibration_targets=calib[1])
    selection_seconds = time.time() - start
    teacher = base if spec["distill"] else None
    train_stage(model, data,
                settings(f"{key} sparsity", args.sparsity_epochs, spec["seed"] + 1, teacher, spec["lr"]),
                pruner=pruner, teacher=teacher)
    if pruner is None:  # control row: the schedule's own cost, with every gate kept
        removed, removal_change, reselections = [], 0.0, 0
    else:
        removed = remove_pruned(model, EXAMPLE, pruner, calibration_inputs=calib[0]).removed
        removal_change, reselections = pruner.last_step.max_abs_change, len(pruner.reselections)
    top1_sparsity = evaluate(model, data)
    top1_final = None
    if spec["finetune"]:
        finetune(model, data,
                 settings(f"{key} finetune", args.finetune_epochs, spec["seed"] + 2, teacher, spec["lr"]),
                 teacher=teacher)
        top1_final = evaluate(model, data)
    return model, {"removed": removed, "removal_change": removal_change,
                   "top1_after_sparsity": top1_sparsity, "top1_finetuned": top1_final,
                   "selection_seconds": selection_seconds, "reselections": reselections}


def measure(model, base_plain, table, args):
    plain = resconv_plugin.deployed(model)
    flops = resconv_plugin.count_flops(plain, EXAMPLE)
    lat = resconv_plugin.interleaved_latencies({"row": lambda: plain(EXAMPLE), "base": lambda: base_plain(EXAMPLE)},
                                               repeats=args.repeats)
    return {"flops": flops.total, "params": flops.params, "latency_ms": 1e3 * lat["row"],
            "baseline_latency_ms": 1e3 * lat["base"], "latency_rel": lat["row"] / lat["base"]}


def results_name(arch, quick=False):
    """``ablation_depth`` for the default architecture, ``ablation_depth_<arch>`` for another."""
    return "ablation_depth" + ("" if arch == DEFAULT_ARCH else f"_{arch}") + ("_quick" if quick else "")


def load_baseline(args, data):
    if not args.quick:
        path = BASELINES / f"{args.arch}_fmnist.safetensors"
        if not path.exists():
            raise SystemExit(f"{path} is missing: train it first with python benchmarks/baselines/train.py "
                             f"--arch {args.arch}")
        return resconv_plugin.load(path)
    if args.arch != DEFAULT_ARCH:
        raise SystemExit(f"--quick trains its own {DEFAULT_ARCH} baseline; it does not take --arch {args.arch}")
    cache = Path("runs/bench_cache/ablation_quick_base.safetensors")
    if cache.exists():
        return resconv_plugin.load(cache)
    import timm

    torch.manual_seed(args.seed)
    base = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    settings = StageSettings(name="quick baseline", epochs=1, lr=0.1, seed=args.seed, progress=False)
    train_stage(base, data, settings)
    resconv_plugin.save(base.eval(), cache, model_name="cifar_resnet20", model_kwargs={"num_classes": 10,
                                                                                       "in_chans": 1})
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=DEFAULT_ARCH, help="the baseline to start from (benchmarks/baselines/)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.35])
    parser.add_argument("--low-rates", nargs="*", type=float, default=[0.1, 0.2])
    parser.add_argument("--low-rate-levels", nargs="+", choices=["layer", "block"], default=["layer"],
                        help="gate levels of the low-rate rows")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate of both phases; rows at "
                        "another lr than 0.02 carry it in their key (e.g. b0.2-layer-removal-kdon-noft-lr0.005-s0)")
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--val-subset", type=int, default=0, help="test images (0 = all 10,000)")
    parser.add_argument("--sparsity-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=256, help="calibration images (training split)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rows", nargs="*", default=["*"], help="fnmatch patterns of row keys to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1024 images, 1 epoch per phase, 3 rows, quick "
                                                              "baseline (under 2 minutes)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the finished rows")
    args = parser.parse_args()
    if args.report:
        name = results_name(args.arch)
        rows_dir = RESULTS / f"{name}_rows"
        if not any(rows_dir.glob("*.json")):
            raise SystemExit(f"--report: no finished rows in {rows_dir}")
        report(name, rows_dir, json.loads(next(rows_dir.glob("*.json")).read_text())["baseline_top1"])
        return
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = results_name(args.arch, args.quick)
    if args.quick:
        args.train_subset, args.val_subset, args.sparsity_epochs, args.finetune_epochs = 1024, 2000, 1, 1
        args.repeats = 10
        args.budgets, args.low_rates, args.calibration = [0.5], [], 64
        args.rows = [f"b0.5-layer-*-kdoff-s{args.seed}"]
    rows_dir = RESULTS / f"{name}_rows"
    data = build_datasets("fashion-mnist", train_subset=args.train_subset, val_subset=args.val_subset, seed=args.seed)
    calib = calibration_batch(data, args.calibration, seed=1000 + args.seed)
    base = load_baseline(args, data).eval()
    base_top1 = evaluate(base, data)
    base_plain = resconv_plugin.deployed(base)
    base_flops = resconv_plugin.count_flops(base_plain, EXAMPLE).total
    table_model = copy.deepcopy(base)
    resconv_plugin.convert(table_model, EXAMPLE)
    table_pruner = resconv_plugin.LayerPruner(table_model, EXAMPLE, latency_reduction=0.0,
                                              latency_repeats=args.repeats)
    table, table_total = table_pruner.savings("latency")
    keys = [k for k in (with_lr(k, args.lr) for k in row_keys(args.budgets, args.low_rates, args.seed,
                                                               args.low_rate_levels))
            if any(fnmatch.fnmatch(k, p) for p in args.rows)]
    print(f"baseline {base_top1:.2f}%, {base_flops / 1e6:.2f} MFLOPs; {len(keys)} rows", flush=True)
    for key in keys:
        path = rows_dir / f"{key}.json"
        if path.exists():
            continue
        start = time.time()
        model, info = run_row(key, base, data, calib, args)
        info.update(measure(model, base_plain, table, args))
        spec = parse_key(key)
        if spec["level"] == "layer":
            predicted = resconv_plugin.pruning.predicted_saving(table, info["removed"])
            info["latency_rel_predicted"] = 1 - predicted / table_total
        record = {"key": key, "arch": args.arch, **spec, **info, "baseline_top1": base_top1, "flops_rel": info["flops"] / base_flops,
                  "minutes": (time.time() - start) / 60, "environment": environment()}
        write_json(path, record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("environment", "removed")}), flush=True)
    report(name, rows_dir, base_top1)


def report(name, rows_dir, base_top1):
    records = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    order = {k: i for i, k in enumerate(row_keys([0.5, 0.35], [0.1, 0.2], 0, ("layer", "block")))}
    records.sort(key=lambda r: (r["seed"], order.get(r["key"].rsplit("-s", 1)[0] + "-s0", 1e9)))
    header = ["row", "top-1 after sparsity (no ft) %", "change", "top-1 fine-tuned %", "change", "FLOPs removed",
              "latency vs base", "table's prediction", "removed"]
    rows = []
    for r in records:
        ft = r["top1_finetuned"]
        rows.append([r["key"], f"{r['top1_after_sparsity']:.2f}", f"{r['top1_after_sparsity'] - base_top1:+.2f}",
                     "-" if ft is None else f"{ft:.2f}", "-" if ft is None else f"{ft - base_top1:+.2f}",
                     f"{1 - r['flops_rel']:.1%}", f"{r['latency_rel']:.2f}",
                     f"{r['latency_rel_predicted']:.2f}" if r.get("latency_rel_predicted") is not None else "-",
                     " ".join(r["removed"])])
    summary = {"benchmark": name, "baseline_top1": base_top1,
               "rows": {r["key"]: {"top1_after_sparsity": r["top1_after_sparsity"],
                                   "top1_finetuned": r["top1_finetuned"], "flops_removed": 1 - r["flops_rel"],
                                   "latency_rel": r["latency_rel"]} for r in records}}
    by_setting: dict = {}
    for r in records:
        by_setting.setdefault(r["key"].rsplit("-s", 1)[0], []).append(r)
    seeds = ["", "## Rows with more than one seed", "",
             "Change = top-1 (fine-tuned, or after removal for the no-fine-tuning rows) minus the baseline's; mean "
             "and spread (max - min) over the seeds.", "",
             "| setting | seeds | change per seed | mean change | spread |", "|---|---|---|---|---|"]
    summary["seeds"] = {}
    for setting, group in by_setting.items():
        if len(group) < 2:
            continue
        changes = [(r["top1_finetuned"] if r["top1_finetuned"] is not None else r["top1_after_sparsity"]) - base_top1
                   for r in group]
        summary["seeds"][setting] = {"seeds": [r["seed"] for r in group], "changes": changes,
                                     "mean_change": sum(changes) / len(changes),
                                     "spread": max(changes) - min(changes)}
        seeds.append(f"| {setting} | {', '.join(str(r['seed']) for r in group)} | "
                     f"{' / '.join(f'{c:+.2f}' for c in changes)} | {sum(changes) / len(changes):+.2f} | "
                     f"{max(changes) - min(changes):.2f} |")
    env = dict(records[-1]["environment"] if records else environment())
    arch = records[0].get("arch", DEFAULT_ARCH) if records else DEFAULT_ARCH
    env["command"] = "python benchmarks/ablation_depth.py" + ("" if arch == DEFAULT_ARCH else f" --arch {arch}")
    runs: dict = {}
    for r in records:
        run = (r["environment"].get("command", "?"), r["environment"].get("cpu", "?"))
        runs[run] = runs.get(run, 0) + 1
    if not summary["seeds"]:
        seeds = []
    seeds += ["", "## How the rows were run", "",
              "The command above runs (and resumes) the whole seed-0 grid; the rows were run in pieces by these "
              "commands, in several sessions. Each row's JSON records its command, commit and machine. A row is "
              "deterministic per seed on one machine and thread count (a seed-1 row run twice gave the same "
              "top-1); another CPU or thread count changes float summation order, so the last digits may differ. "
              "Latency ratios are per machine.", "",
              "| command | machine | rows |", "|---|---|---|"]
    seeds += [f"| `{command}` | {cpu} | {n} |" for (command, cpu), n in runs.items()]
    write_results(name, {"environment": env, "records": records, "summary": summary}, header, rows,
                  notes=__doc__.split("Finished rows")[0].strip().replace("\n", " "),
                  sections="\n".join(seeds) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
