"""Latency where CPU users deploy: depth- vs channel-pruned models of equal FLOPs in PyTorch eager,
``torch.compile``, ONNX Runtime and OpenVINO, at batch 1 and 32.

Models: those of ``latency_equal_flops.py`` (same seed, same construction): per architecture and FLOPs budget the
deployed baseline, the depth-pruned model (LayerPruner, random gates, fused, BN folded) and two channel-pruned
models of equal FLOPs (torch-pruning MetaPruner, L2 magnitude, global; default rounding and ``round_to=8``), all
with random weights (latency does not depend on them).

Runtimes (all on this CPU, ``--threads`` threads each, default: each runtime's own default):
* ``eager``: PyTorch eager, eval, ``torch.no_grad``.
* ``compile``: ``torch.compile(model)`` (inductor, CPU), compiled and warmed up per batch size before timing.
* ``onnxruntime``: the file of ``resconv_plugin.export_onnx`` (dynamic batch, checked against PyTorch to 1e-4),
  CPU execution provider, all graph optimisations on.
* ``openvino``: that ONNX file compiled by OpenVINO for "CPU" (skipped with a note if openvino is not installed:
  ``pip install 'resconv-plugin[deploy-bench]'``).

Figures: ms = median wall time of one forward over ``--repeats`` rounds in which the four models of a setting run in
turns (rotating order) in the same runtime; ratio = depth / channel (< 1: depth is faster) from that same run. Peak
MB: peak resident-memory growth over the first batch-32 forward (after loading / compiling) in a fresh process per
model and runtime (VmHWM reset just before the forward).

Finished settings are kept under benchmarks/results/<name>_rows/ (one JSON per architecture and budget; commit
them): the same command resumes at the next setting.

Usage: python benchmarks/deploy_latency.py [--quick] [--archs ...] [--budgets 0.4 0.6] [--runtimes ...]
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
import time
import warnings
from pathlib import Path

import timm
import torch

import resconv_plugin
from common import RESULTS, environment, resumed_row, write_results
from latency_equal_flops import ARCHS, depth_pruned, match_flops

MODELS = ("baseline", "depth", "channel", "channel_r8")
RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def runner(runtime: str, model: torch.nn.Module, onnx_path: Path, batch: int, x: torch.Tensor, threads: int = 0):
    """A zero-argument function running one forward of ``model`` in ``runtime`` on ``x`` (compiled / loaded)."""
    if runtime == "eager":
        return lambda: model(x)
    if runtime == "compile":
        # every model x batch size is a new compile of the same forward: past dynamo's recompile limit (8) it would
        # silently run eager, so the limit is raised and hitting it is an error, never an eager row labelled compile
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        with torch.no_grad():
            compiled(x)  # compile now, not inside the timing
        return lambda: compiled(x)
    if runtime == "onnxruntime":
        session = resconv_plugin.deploy.onnx_session(onnx_path, threads=threads)
        name, array = session.get_inputs()[0].name, x.numpy()
        return lambda: session.run(None, {name: array})
    if runtime == "openvino":
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        compiled = ov.Core().compile_model(str(onnx_path), "CPU", config)
        request, array = compiled.create_infer_request(), x.numpy()
        return lambda: request.infer({0: array})
    raise ValueError(f"unknown runtime {runtime!r}")


_PEAK = """
import sys, torch, warnings
warnings.filterwarnings("ignore")
runtime, path, onnx_path, channels, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
threads = int(sys.argv[7])
if threads:
    torch.set_num_threads(threads)
from deploy_latency import runner
import resconv_plugin
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
x = torch.randn(32, channels, size, size)
model = resconv_plugin.load(path).eval()
with torch.no_grad():
    run = runner(runtime, model, onnx_path, 32, x, threads)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM)
    before = status("VmRSS")
    run()
print(status("VmHWM") - before)
"""


def peak_mb(runtime: str, path: Path, onnx_path: Path, channels: int, size: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", _PEAK, runtime, str(path), str(onnx_path), str(channels), str(size),
                          str(Path(__file__).resolve().parent), str(threads)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"peak memory of {path.name} in {runtime} failed: {out.stderr[-1500:]}")
    return float(out.stdout.strip().splitlines()[-1])


def build_models(arch: str, budget: float, size: int, seed: int):
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    base = timm.create_model(arch, num_classes=spec["num_classes"]).eval()
    x = torch.randn(1, 3, size, size)
    models = {"baseline": resconv_plugin.deployed(base), "depth": depth_pruned(base, x, spec["level"], budget, seed)}
    target = resconv_plugin.count_flops(models["depth"], x).total
    for variant, round_to in (("channel", None), ("channel_r8", 8)):
        models[variant] = match_flops(base, x, target, round_to)[0]
    return models, x


def run_setting(arch: str, budget: float, args, folder: Path) -> dict:
    size = ARCHS[arch]["size"] if arch.startswith("cifar") or not args.size else args.size
    models, x1 = build_models(arch, budget, size, args.seed)
    files, onnx_files, flops = {}, {}, {}
    for name, model in models.items():
        files[name] = resconv_plugin.save(model, folder / f"{arch}_{budget}_{name}.safetensors")
        onnx_files[name] = resconv_plugin.export_onnx(model, x1, folder / f"{arch}_{budget}_{name}.onnx").path
        flops[name] = resconv_plugin.count_flops(model, x1).total
    record = {"arch": arch, "input": size, "budget": budget, "flops": flops, "ms": {}, "ratio_depth_over_channel": {},
              "ratio_depth_over_channel_r8": {}, "peak_mb_b32": {}, "compile_seconds": {}}
    for runtime in args.runtimes:
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            start = time.time()
            if runtime == "compile":
                torch._dynamo.reset()  # only the four models timed now in dynamo's cache (each call checks guards)
            with torch.no_grad():
                fns = {name: runner(runtime, model, onnx_files[name], batch, x, args.threads)
                       for name, model in models.items()}
                ms = {k: 1e3 * v for k, v in resconv_plugin.interleaved_latencies(fns, repeats=args.repeats).items()}
            key = f"{runtime}_b{batch}"
            if runtime == "compile":
                record["compile_seconds"][key] = time.time() - start
            record["ms"][key] = ms
            record["ratio_depth_over_channel"][key] = ms["depth"] / ms["channel"]
            record["ratio_depth_over_channel_r8"][key] = ms["depth"] / ms["channel_r8"]
            print(f"{arch} {budget:.0%} {key}: depth/channel_r8 {ms['depth'] / ms['channel_r8']:.2f}, depth/channel "
                  f"{ms['depth'] / ms['channel']:.2f} ({', '.join(f'{k} {v:.2f} ms' for k, v in ms.items())})",
                  flush=True)
        if not args.no_memory:
            record["peak_mb_b32"][runtime] = {name: peak_mb(runtime, files[name], onnx_files[name], 3, size,
                                                            args.threads) for name in models}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet56, one budget, eager + onnxruntime + "
                                                              "openvino, 10 repeats, no memory")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, help="input side for the ImageNet models (default 224)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: each one's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="deploy_latency")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.budgets, args.repeats, args.no_memory = ["cifar_resnet56"], [0.4], 10, True
        args.runtimes = ["eager", "onnxruntime", "openvino"]
        args.name += "_quick"
    notes = []
    if "openvino" in args.runtimes and not has_openvino():
        args.runtimes.remove("openvino")
        notes.append("OpenVINO is not installed: no openvino rows (pip install 'resconv-plugin[deploy-bench]').")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_dir = RESULTS / f"{args.name}_rows"
    folder = Path(tempfile.mkdtemp())
    records = []
    for arch in args.archs:
        for budget in args.budgets:
            records.append(resumed_row(rows_dir / f"{arch}_{budget}.json",
                                       lambda: dict(run_setting(arch, budget, args, folder), environment=environment())))
    keys = sorted({k for r in records for k in r["ms"]})
    summary = {"benchmark": args.name, "settings": len(records),
               "median_ratio_depth_over_channel_r8": {
                   k: statistics.median(r["ratio_depth_over_channel_r8"][k] for r in records if k in r["ms"])
                   for k in keys},
               "median_ratio_depth_over_channel": {
                   k: statistics.median(r["ratio_depth_over_channel"][k] for r in records if k in r["ms"])
                   for k in keys}}
    header = ["arch", "FLOPs removed", "runtime, batch", "baseline ms", "depth ms", "channel ms", "channel_r8 ms",
              "depth / channel", "depth / channel_r8"]
    rows = []
    for r in records:
        for k in keys:
            if k not in r["ms"]:
                continue
            ms = r["ms"][k]
            rows.append([r["arch"], f"{1 - r['flops']['depth'] / r['flops']['baseline']:.0%}", k.replace("_b", ", b"),
                         *(f"{ms[m]:.2f}" for m in MODELS), f"{r['ratio_depth_over_channel'][k]:.2f}",
                         f"{r['ratio_depth_over_channel_r8'][k]:.2f}"])
    memory = ["", "## Peak memory (MB, batch 32)", "", "| arch | FLOPs removed | runtime | " + " | ".join(MODELS) + " |",
              "|---|---|---|" + "---|" * len(MODELS)]
    for r in records:
        for runtime, peaks in r.get("peak_mb_b32", {}).items():
            memory.append(f"| {r['arch']} | {1 - r['flops']['depth'] / r['flops']['baseline']:.0%} | {runtime} | "
                          + " | ".join(f"{peaks[m]:.0f}" for m in MODELS) + " |")
    archs = list(dict.fromkeys(r["arch"] for r in records))
    summary["per_arch_ratio_depth_over_channel_r8"] = {
        a: {k: statistics.median(r["ratio_depth_over_channel_r8"][k] for r in records if r["arch"] == a and k in r["ms"])
            for k in keys if any(r["arch"] == a and k in r["ms"] for r in records)} for a in archs}
    verdict = ["", "## Median depth / channel_r8 latency per runtime (< 1: depth faster)", "",
               "All: median over every architecture and budget; per architecture: median over its budgets.", "",
               "| runtime, batch | all | " + " | ".join(archs) + " |", "|---|---|" + "---|" * len(archs)]
    verdict += [f"| {k.replace('_b', ', b')} | {v:.2f} | " + " | ".join(
        f"{summary['per_arch_ratio_depth_over_channel_r8'][a][k]:.2f}"
        if k in summary["per_arch_ratio_depth_over_channel_r8"][a] else "" for a in archs) + " |"
        for k, v in summary["median_ratio_depth_over_channel_r8"].items()]
    env = records[-1]["environment"] if records else environment()
    write_results(args.name, {"environment": env, "records": records, "summary": summary, "args": vars(args)},
                  header, rows, notes=" ".join([__doc__.split("Finished settings")[0].strip().replace("\n", " ")]
                                               + notes),
                  sections="\n".join(verdict + memory) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
