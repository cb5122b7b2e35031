"""Budget-driven depth pruning on real Fashion-MNIST: budgeted gates exactly 0, removal changes accuracy by exactly 0.

The default suite runs examples/depth_prune_fashion_mnist.py in its --quick form (a subset, 1 + 1 epochs); the slow
test runs it on the full data with more epochs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_fashion_mnist

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "depth_prune_fashion_mnist.py"


def run(*args, timeout=600):
    require_fashion_mnist()
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(summary, target):
    assert summary["budgeted_gates_all_zero"] is True
    assert summary["removed"] == summary["budgeted_layers"] and summary["removed"]
    assert summary["removal_output_change"] == 0.0
    assert summary["acc_after_removal"] == summary["acc_after_sparsity"]  # exactly 0 change
    assert summary["acc_fused"] == summary["acc_after_removal"]
    assert summary["acc_converted"] == summary["acc_baseline"]
    assert summary["flops_reduction"] >= target


def test_quick_real_data():
    check(run("--quick", "--flops-reduction", "0.3"), 0.3)


@pytest.mark.slow
def test_full_real_data():
    summary = run("--baseline-epochs", "4", "--sparsity-epochs", "2", "--flops-reduction", "0.4", timeout=3600)
    check(summary, 0.4)
    assert summary["acc_baseline"] > 88.0
