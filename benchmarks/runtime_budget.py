"""Latency budgets planned in the runtime you deploy to: a budget planned in one runtime, measured in every runtime.

For each architecture, batch size and planning runtime: the model, converted with block gates, gets a latency budget
(``--budget`` 0.6 of the deployed model's latency, i.e. ``LayerPruner(latency_reduction=0.4)``) planned with a
``resconv_plugin.LatencyCost`` of that runtime (its lookup table over every gate, then the measured fit of the chosen
set); the pruned model is then timed against the unpruned one in *every* runtime at the same batch size. Gates are
all at 1 (importance ``magnitude`` ties): the selection is the fewest gates whose table entries meet the goal, so
the set chosen depends on the runtime's table only.

Architectures: ``cifar_resnet56`` (the committed Fashion-MNIST baseline, ``benchmarks/baselines/``, 1x28x28) and
``resnet18`` (random weights, 3x224x224: latency does not depend on them). The lookup table of ``resnet50`` (3x224x224,
block gates, batch 1) is also built in every runtime, for its build time alone.

Runtimes (``--threads`` threads each, default 1): ``eager`` (PyTorch), ``compile`` (``torch.compile``),
``onnxruntime`` and ``openvino`` (the fused, BatchNorm-folded ONNX export; ``pip install
'resconv-plugin[deploy-bench]'``; a runtime that is not installed is left out with a note); ``tensorrt`` only when
asked for (``--runtimes ... tensorrt``, a CUDA GPU).

Figures:
* matrix: latency of the pruned model / the unpruned one, both as deployed, timed in turns (median of
  ``--measure-repeats`` rounds), rows = the runtime the budget was planned in, columns = the runtime measured in.
  The diagonal is the budget met where it was planned; the eager row read in ONNX Runtime / OpenVINO is how far a
  budget planned in eager PyTorch misses there.
* table error: the lookup table's prediction for the chosen set (1 - the sum of its entries / the model's latency)
  minus what that set measured in the same runtime (the matrix's diagonal), and the same for the fit's first set
  (before any correction).
* table seconds: wall time to build the lookup table (exports included for the ONNX runtimes); fit seconds: the
  measured correction after it.

Finished settings are kept under ``benchmarks/results/<name>_rows/`` (one JSON per architecture, batch size and
planning runtime, and per runtime for the resnet50 tables; commit them): the same command resumes at the next one.
The machine must be otherwise idle: every figure is a timing.

Full run (about 4-5 hours on 2 cores, most of it resnet18 at batch 32):
    python benchmarks/runtime_budget.py --threads 1
Smoke check (under 2 minutes; cifar_resnet20, batch 1, eager / onnxruntime / openvino, few repeats, its eager
table timed instead of resnet50's; outputs ``results/runtime_budget_quick*``, not committed):
    python benchmarks/runtime_budget.py --quick

Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, List

import timm
import torch

import resconv_plugin
from resconv_plugin import LatencyCost, LayerPruner
from resconv_plugin.pruning import latency_table, set_saving
from common import RESULTS, environment, resumed_row, write_results

BASELINES = Path(__file__).resolve().parent / "baselines"
ARCHS = {  # input (C, H, W) and where the weights come from
    "cifar_resnet56": {"input": (1, 28, 28), "baseline": "cifar_resnet56_fmnist.safetensors"},
    "cifar_resnet20": {"input": (1, 28, 28), "baseline": "cifar_resnet20_fmnist.safetensors"},
    "resnet18": {"input": (3, 224, 224), "baseline": None},
    "resnet50": {"input": (3, 224, 224), "baseline": None},
}
RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")
PACKAGE = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
TOLERANCE = 0.03  # the acceptance: a budget planned in a runtime is met there within this


def versions() -> dict:
    """The environment record, with the version of every runtime installed."""
    import importlib.metadata as md

    env = environment()
    for package in PACKAGE.values():
        if importlib.util.find_spec(package) is not None:
            env[package] = md.version(package)
    return env


def base_model(arch: str, seed: int) -> torch.nn.Module:
    """The unpruned model (the committed baseline, else seeded random weights), converted with block gates."""
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    if spec["baseline"]:
        model = resconv_plugin.load(BASELINES / spec["baseline"])
    else:
        model = timm.create_model(arch, num_classes=1000)
    model = model.eval()
    resconv_plugin.convert(model, example(arch), level="block")
    return model


def example(arch: str, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, *ARCHS[arch]["input"], generator=torch.Generator().manual_seed(0))


def plan(arch: str, batch: int, runtime: str, base: torch.nn.Module, args) -> dict:
    """The budget planned in ``runtime`` at ``batch``: the chosen gates, the table's prediction, the fit, the times."""
    cost = LatencyCost(runtime, batch_size=batch, threads=args.threads, repeats=args.repeats)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    pruner = LayerPruner(model, example(arch), importance="magnitude", latency_reduction=1 - args.budget,
                         latency_cost=cost)  # builds the table (its reachability is checked as the pruner is built)
    table_seconds = time.perf_counter() - start
    chosen = pruner.select()  # the measured fit
    fit_seconds = time.perf_counter() - start - table_seconds
    table, full = pruner.savings("latency")
    fit = copy.deepcopy(pruner.latency_fit)  # (step() starts the pruner afresh on the pruned model)
    pruner.step()
    first = fit["rounds"][0] if fit else None
    return {"arch": arch, "batch": batch, "planned_in": runtime, "budget": args.budget, "latency": cost.as_dict(),
            "gates": len(table), "removed": sorted(chosen), "table_seconds": table_seconds,
            "fit_seconds": fit_seconds, "table_full_ms": 1e3 * full,
            "predicted_rel": 1 - set_saving(table, chosen) / full,
            "fit_first": None if first is None else {"predicted_rel": 1 - first["predicted"],
                                                     "measured_rel": 1 - first["measured"]},
            "fit": fit, "model": model}


def measure(record: dict, base: torch.nn.Module, costs: Dict[str, LatencyCost], arch: str) -> None:
    """The pruned model's latency relative to the unpruned one's, in every runtime (timed in turns)."""
    record["measured_rel"] = {}
    for runtime, cost in costs.items():
        times = cost.compare({"base": base, "pruned": record["model"]}, example(arch))
        record["measured_rel"][runtime] = times["pruned"] / times["base"]
    own = record["measured_rel"].get(record["planned_in"])
    record["table_error"] = None if own is None else record["predicted_rel"] - own


def table_time(arch: str, runtime: str, args) -> dict:
    """Seconds to build ``arch``'s lookup table (block gates, batch 1) in ``runtime``."""
    model = base_model(arch, args.seed)
    cost = LatencyCost(runtime, batch_size=1, threads=args.threads, repeats=args.repeats)
    gates = list(resconv_plugin.gated_modules(model))
    start = time.perf_counter()
    table, full = latency_table(model, gates, (example(arch),), cost=cost)
    return {"arch": arch, "runtime": runtime, "gates": len(gates), "table_seconds": time.perf_counter() - start,
            "full_ms": 1e3 * full, "latency": cost.as_dict()}


def summarise(records: List[dict], tables: List[dict], budget: float) -> dict:
    diagonal = [r["measured_rel"][r["planned_in"]] - budget for r in records if r["planned_in"] in r["measured_rel"]]
    eager_misses = {f"{r['arch']}_b{r['batch']}_{m}": v - budget for r in records if r["planned_in"] == "eager"
                    for m, v in r["measured_rel"].items() if m != "eager"}
    return {
        "budget": budget, "plans": len(records),
        "met_where_planned_within": {f"{r['arch']}_b{r['batch']}_{r['planned_in']}":
                                     r["measured_rel"][r["planned_in"]] - budget for r in records},
        "max_abs_miss_where_planned": max((abs(d) for d in diagonal), default=None),
        "within_tolerance_where_planned": sum(abs(d) <= TOLERANCE for d in diagonal),
        "eager_plan_miss_elsewhere": eager_misses,
        "table_error_by_runtime": {rt: statistics.median(r["table_error"] for r in records if r["planned_in"] == rt)
                                   for rt in dict.fromkeys(r["planned_in"] for r in records)},
        "table_seconds": {f"{t['arch']}_{t['runtime']}": t["table_seconds"] for t in tables},
    }


def markdown(records: List[dict], tables: List[dict], runtimes: List[str], budget: float) -> str:
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in records):
        for batch in sorted({r["batch"] for r in records if r["arch"] == arch}):
            rows = [r for r in records if r["arch"] == arch and r["batch"] == batch]
            lines += ["", f"## {arch}, batch {batch}: latency / unpruned, planned in (rows) x measured in (columns), "
                          f"budget {budget}", "", "| planned in | " + " | ".join(runtimes) + " |",
                      "|---|" + "---|" * len(runtimes)]
            lines += [f"| {r['planned_in']} | " + " | ".join(
                ("**{:.3f}**" if m == r["planned_in"] else "{:.3f}").format(r["measured_rel"][m])
                if m in r["measured_rel"] else "-" for m in runtimes) + " |" for r in rows]
    lines += ["", "## Lookup tables: prediction error and build time", "",
              "| arch | batch | planned in | gates | removed | table predicts | measured there | table error | "
              "fit's first set: predicts / measures | table s | fit s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        first = r["fit_first"]
        lines.append(f"| {r['arch']} | {r['batch']} | {r['planned_in']} | {r['gates']} | {len(r['removed'])} | "
                     f"{r['predicted_rel']:.3f} | {r['measured_rel'][r['planned_in']]:.3f} | {r['table_error']:+.3f} | "
                     + (f"{first['predicted_rel']:.3f} / {first['measured_rel']:.3f}" if first else "-")
                     + f" | {r['table_seconds']:.1f} | {r['fit_seconds']:.1f} |")
    if tables:
        lines += ["", "## Lookup table build time, batch 1 (block gates)", "", "| arch | runtime | gates | seconds |",
                  "|---|---|---|---|"]
        lines += [f"| {t['arch']} | {t['runtime']} | {t['gates']} | {t['table_seconds']:.1f} |" for t in tables]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke check: cifar_resnet20, batch 1, eager / "
                                                              "onnxruntime / openvino, few repeats, its eager "
                                                              "table timed instead of resnet50's")
    parser.add_argument("--archs", nargs="+", default=["cifar_resnet56", "resnet18"], choices=list(ARCHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES) + ["tensorrt"])
    parser.add_argument("--budget", type=float, default=0.6, help="the latency to keep, a fraction of the unpruned")
    parser.add_argument("--repeats", type=int, default=20, help="timing rounds of the table and the fit")
    parser.add_argument("--measure-repeats", type=int, default=30, help="timing rounds of the matrix")
    parser.add_argument("--table-archs", nargs="*", default=["resnet50"], choices=list(ARCHS),
                        help="architectures whose batch-1 lookup table is built in every runtime for its time alone")
    parser.add_argument("--table-runtimes", nargs="*", choices=list(RUNTIMES) + ["tensorrt"],
                        help="the runtimes of those tables (default: --runtimes)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every runtime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="runtime_budget")
    parser.add_argument("--finished-only", action="store_true",
                        help="plan and time nothing: summarise the rows of these settings finished so far (a run "
                             "that spans sessions, or settings left out), naming those still missing")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.batches, args.table_archs = ["cifar_resnet20"], [1], ["cifar_resnet20"]
        args.runtimes, args.table_runtimes = ["eager", "onnxruntime", "openvino"], ["eager"]
        args.repeats, args.measure_repeats = 5, 10
        args.name += "_quick"
    notes = []
    for runtime in list(args.runtimes):
        if runtime in PACKAGE and importlib.util.find_spec(PACKAGE[runtime]) is None:
            args.runtimes.remove(runtime)
            notes.append(f"{runtime} is not installed: no {runtime} rows or columns "
                         f"(pip install 'resconv-plugin[{'deploy-bench' if runtime != 'tensorrt' else 'tensorrt'}]').")
    args.table_runtimes = [r for r in (args.table_runtimes or args.runtimes) if r in args.runtimes]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows_dir = RESULTS / f"{args.name}_rows"
    records, tables, missing = [], [], []
    for arch in args.archs:
        base = {}  # built on first use (not at all when every row of the architecture is kept)
        for batch in args.batches:
            # one LatencyCost per runtime for every plan of this batch: the unpruned model is built in each once
            costs = {m: LatencyCost(m, batch_size=batch, threads=args.threads, repeats=args.measure_repeats)
                     for m in args.runtimes}
            for runtime in args.runtimes:
                def planned(arch=arch, batch=batch, runtime=runtime, costs=costs) -> dict:
                    if "model" not in base:
                        base["model"] = base_model(arch, args.seed)
                    model = base["model"]
                    record = plan(arch, batch, runtime, model, args)
                    measure(record, model, costs, arch)
                    del record["model"]
                    print(f"{arch} b{batch} planned in {runtime}: {len(record['removed'])}/{record['gates']} gates, "
                          f"table {record['table_seconds']:.1f} s, measured "
                          + ", ".join(f"{m} {v:.3f}" for m, v in record["measured_rel"].items()), flush=True)
                    return dict(record, seed=args.seed, environment=versions())

                path = rows_dir / f"{arch}_b{batch}_{runtime}.json"
                if args.finished_only and not path.exists():
                    missing.append(path.stem)
                    continue
                records.append(resumed_row(path, planned))
    for arch in args.table_archs:
        for runtime in args.table_runtimes:
            def timed(arch=arch, runtime=runtime) -> dict:
                row = dict(table_time(arch, runtime, args), seed=args.seed, environment=versions())
                print(f"{arch} table in {runtime}: {row['gates']} gates, {row['table_seconds']:.1f} s", flush=True)
                return row

            path = rows_dir / f"table_{arch}_{runtime}.json"
            if args.finished_only and not path.exists():
                missing.append(path.stem)
                continue
            tables.append(resumed_row(path, timed))
    if missing:
        notes.append(f"Not run yet (left out of this summary): {', '.join(missing)}.")
    summary = {"benchmark": args.name, **summarise(records, tables, args.budget), "not_run": missing}
    header = ["arch", "batch", "planned in", *(f"measured in {m}" for m in args.runtimes), "table s"]
    rows = [[r["arch"], r["batch"], r["planned_in"], *(f"{r['measured_rel'].get(m, float('nan')):.3f}"
                                                       for m in args.runtimes), f"{r['table_seconds']:.1f}"]
            for r in records]
    env = versions()
    write_results(args.name, {"environment": env, "records": records, "tables": tables, "summary": summary,
                              "args": vars(args)}, header, rows,
                  notes=" ".join([__doc__.split("Finished settings")[0].strip().replace("\n", " ")] + notes),
                  sections=markdown(records, tables, args.runtimes, args.budget))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
