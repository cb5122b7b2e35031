#!/usr/bin/env bash
# GPU check: the first thing to run on a machine with a CUDA GPU (docs/gpu.md says how to get one ready).
#
# Usage, from anywhere in the repository:
#   benchmarks/gpu_check.sh
#   PYTHON=python3 GPU_CHECK_RESULTS=$OUT benchmarks/gpu_check.sh     # a lent machine: results straight into $OUT
#
# What it does, in order (sized for a 15-minute device lease; not yet run on a GPU when written):
#   1. the CUDA tests: pytest tests/test_device.py with CI=true (a missing dataset fails instead of skipping);
#   2. `resconv compress` of cifar_resnet20 on Fashion-MNIST (--train-subset 20000, batch 128, 2 baseline epochs,
#      no sparsity or fine-tuning epochs) on CUDA with --amp none, bf16 and fp16: the seconds of each epoch (the first
#      includes cuDNN's warm-up) from report.json, and the wall time of the whole command;
#   3. `resconv demo --device cuda`, then GPU latency of each of the demo's stages (deployed models as saved, fp32,
#      torch's default TF32 settings) at batch 1 and batch 32: medians of 50 rounds timed in turns, synchronised.
# It writes $GPU_CHECK_RESULTS/gpu_check.json and gpu_check.md (default benchmarks/results/): versions, GPU name,
# the tests' outcome, epoch times and latencies. Logs and run folders go to runs/gpu_check/.
#
# Environment:
#   PYTHON                     interpreter (default: .venv/bin/python if there, else python3); the package is used
#                              from this checkout (PYTHONPATH) when it is not installed
#   RESCONV_FASHION_MNIST_DIR  Fashion-MNIST's four idx files (default: /usr/share/datasets/fashion-mnist, or
#                              data/fashion-mnist in the repository)
#   GPU_CHECK_RESULTS          where gpu_check.json / .md go (default: benchmarks/results)
#   GPU_CHECK_TESTS            what pytest runs (default: tests/test_device.py)
#   GPU_CHECK_DEMO_ARGS        more `resconv demo` options (e.g. --quick)
# Exit status: 0 when the tests passed and every run finished, 1 otherwise (the results are written either way),
# 2 when there is no CUDA GPU or a required package is missing.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
RESULTS=${GPU_CHECK_RESULTS:-benchmarks/results}
RUNS=runs/gpu_check
TESTS=${GPU_CHECK_TESTS:-tests/test_device.py}
if [ -z "${RESCONV_FASHION_MNIST_DIR:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d data/fashion-mnist ]
then
    export RESCONV_FASHION_MNIST_DIR=$ROOT/data/fashion-mnist
fi

if ! "$PY" -c "import resconv_plugin" 2>/dev/null; then
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): nothing to check" >&2
    exit 2
fi
if ! missing=$("$PY" -c "
import importlib.util as u
names = ['timm', 'torch_pruning', 'fvcore', 'safetensors', 'pytest', 'onnx', 'onnxscript', 'onnxruntime']
print(' '.join(n for n in names if u.find_spec(n) is None))") || [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks: ${missing:-?} (docs/gpu.md: carrying wheels to a machine without internet)" >&2
    exit 2
fi

rm -rf "$RUNS"
mkdir -p "$RUNS" "$RESULTS"
failed=0

echo "== 1/3 CUDA tests: $TESTS"
CI=true "$PY" -m pytest -q -rs -p no:cacheprovider $TESTS --junitxml="$RUNS/tests.xml" 2>&1 | tee "$RUNS/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=1

echo "== 2/3 one compress epoch per --amp on CUDA"
for amp in none bf16 fp16; do
    start=$(date +%s.%N)
    "$PY" -m resconv_plugin.cli compress --model cifar_resnet20 --data fashion-mnist --train-subset 20000 \
        --epochs 2 --sparsity-epochs 0 --finetune-epochs 0 --batch-size 128 --device cuda --amp "$amp" \
        --no-progress --no-plots --restart --output "$RUNS/epoch-$amp" >"$RUNS/epoch-$amp.log" 2>&1
    status=$?
    echo "$amp $status $(date +%s.%N) $start" >>"$RUNS/epochs.txt"
    [ "$status" -eq 0 ] || { failed=1; tail -20 "$RUNS/epoch-$amp.log"; }
done

echo "== 3/3 the demo on CUDA, then its stages' GPU latency at batch 1 and 32"
# shellcheck disable=SC2086  # GPU_CHECK_DEMO_ARGS is a list of options
"$PY" -m resconv_plugin.cli demo --device cuda --no-progress --no-plots --output "$RUNS/demo" \
    ${GPU_CHECK_DEMO_ARGS:-} >"$RUNS/demo.log" 2>&1 || { failed=1; tail -20 "$RUNS/demo.log"; }

"$PY" - "$RUNS" "$RESULTS" "$failed" <<'EOF'
"""Gather what the steps left in RUNS, time the demo's stages, write RESULTS/gpu_check.json and .md."""
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import timm
import torch
import torch_pruning

import resconv_plugin
from resconv_plugin import interleaved_latencies

runs, results, failed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
device = torch.device("cuda")


def command_output(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


props = torch.cuda.get_device_properties(device)
environment = {
    "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{props.major}.{props.minor}",
    "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
    "driver": command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "timm": timm.__version__, "torch_pruning": torch_pruning.__version__, "resconv_plugin": resconv_plugin.__version__,
    "commit": command_output("git", "rev-parse", "--short", "HEAD"), "python": platform.python_version(),
    "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
}

tests = {"outcome": "not run"}
if (runs / "tests.xml").is_file():
    suite = ET.parse(runs / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    cases = {"failed_tests": [], "skipped_tests": []}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            cases["failed_tests"].append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            cases["skipped_tests"].append(f"{name}: {skipped.get('message', '')}")
    tests = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
             "outcome": "passed" if not (counts["failures"] or counts["errors"]) else "failed", **cases}

epochs = []
for line in (runs / "epochs.txt").read_text().splitlines() if (runs / "epochs.txt").is_file() else []:
    amp, status, end, start = line.split()
    row = {"amp": amp, "exit_status": int(status), "command_seconds": round(float(end) - float(start), 1)}
    report = runs / f"epoch-{amp}" / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        row["epoch_seconds"] = [round(e["seconds"], 2) for e in r["epochs"] if e["stage"] == "baseline"]
        row["val_top1"] = round(r["stages"][0]["top1"], 2)
        row["train_subset"], row["batch_size"] = r["settings"]["train_subset"], r["settings"]["batch_size"]
    epochs.append(row)

demo, latency = {}, []
report = runs / "demo" / "report.json"
if report.is_file():
    r = json.loads(report.read_text())
    demo = {"settings": {k: r["settings"][k] for k in ("model", "data", "train_subset", "epochs", "sparsity_epochs",
                                                          "finetune_epochs", "flops_reduction")},
            "summary": r["summary"], "stages": [{k: s.get(k) for k in ("stage", "top1", "flops", "params")}
                                                for s in r["stages"]]}
    files = {s["stage"]: runs / "demo" / "stages" / f"{s['stage']}.safetensors" for s in r["stages"]}
    shapes = [step["input_shapes"][0][1:] for f in files.values()
              for step in resconv_plugin.deploy.read_recipe(f).get("steps", []) if step.get("input_shapes")]
    shape = tuple(shapes[0]) if shapes else (r["settings"]["in_chans"] or 1, 28, 28)  # the input it converted at
    models = {name: resconv_plugin.load(f).to(device).eval() for name, f in files.items()}
    for batch in (1, 32):
        x = torch.randn(batch, *shape, device=device)
        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
        times = interleaved_latencies(fns, repeats=50, warmup=5, device=device)
        latency += [{"stage": name, "batch": batch, "ms": round(1e3 * seconds, 4)} for name, seconds in times.items()]

data = {"environment": environment, "tests": tests, "epochs": epochs, "demo": demo, "latency": latency,
        "ok": not failed and tests.get("outcome") == "passed"}
(results / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")

md = ["# GPU check (benchmarks/gpu_check.sh)", "",
      f"{environment['gpu']} (compute capability {environment['compute_capability']}, "
      f"{environment['gpu_memory_gib']} GiB, driver {environment['driver']}); torch {environment['torch']} "
      f"(CUDA {environment['cuda']}, cuDNN {environment['cudnn']}), timm {environment['timm']}, torch-pruning "
      f"{environment['torch_pruning']}, resconv_plugin {environment['resconv_plugin']} at {environment['commit']}.",
      "", f"## CUDA tests: {tests.get('outcome')}", ""]
if "tests" in tests:
    md += [f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped "
           f"of {tests['tests']}.", ""]
    md += [f"- failed: `{n}`" for n in tests["failed_tests"]] + [f"- skipped: {n}" for n in tests["skipped_tests"]]
    md.append("")
first = next((row for row in epochs if "train_subset" in row), {})
md += ["## One compress epoch on CUDA", "",
       f"cifar_resnet20, Fashion-MNIST, {first.get('train_subset')} training images, batch {first.get('batch_size')}, "
       "SGD; seconds of the two baseline epochs (the first includes cuDNN's warm-up) and of the whole command "
       "(start-up, data, one-shot pruning, report).", "",
       "| --amp | epoch 1 s | epoch 2 s | command s | top-1 % after 2 epochs |", "|---|---|---|---|---|"]
for row in epochs:
    seconds = row.get("epoch_seconds") or ["-", "-"]
    md.append(f"| {row['amp']} | {seconds[0]} | {seconds[-1]} | {row['command_seconds']} | "
              f"{row.get('val_top1', 'failed (exit ' + str(row['exit_status']) + ')')} |")
md += ["", "## The demo's stages: GPU latency (ms, median of 50 rounds timed in turns)", ""]
if latency:
    by = {(e["stage"], e["batch"]): e["ms"] for e in latency}
    d = demo["settings"]
    md += [f"`resconv demo`: {d['model']} on {d['data']}, {d['train_subset']} training images, {d['epochs']} + "
           f"{d['sparsity_epochs']} + {d['finetune_epochs']} epochs, FLOPs budget {d['flops_reduction']}: FLOPs "
           f"-{100 * demo['summary']['flops_reduction']:.1f}%, top-1 {demo['summary']['top1_change']:+.2f}.", "",
           "| stage | top-1 % | FLOPs (M) | batch 1 ms | batch 32 ms |", "|---|---|---|---|---|"]
    md += [f"| {s['stage']} | {s['top1']:.2f} | {s['flops'] / 1e6:.2f} | {by[(s['stage'], 1)]} | "
           f"{by[(s['stage'], 32)]} |" for s in demo["stages"]]
else:
    md.append("The demo did not finish: see runs/gpu_check/demo.log.")
md.append("")
(results / "gpu_check.md").write_text("\n".join(md))
print("\n".join(md))
sys.exit(0 if data["ok"] else 1)
EOF
status=$?
echo "gpu_check: results in $RESULTS/gpu_check.json and $RESULTS/gpu_check.md"
exit "$status"
