"""``LatencyCost``: timing a deployed model in the runtime it is deployed to (eager, torch.compile, ONNX Runtime,
OpenVINO; TensorRT's refusal without CUDA), its caches, its bad inputs, and its use by the pruners, the command and
the report. No absolute times: only rankings of models whose costs differ many times over."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resconv_plugin
from resconv_plugin import LatencyCost
from resconv_plugin.deploy import onnx_export
from resconv_plugin.pruning import JointPlanner, LayerPruner, latency_table, measured_saving

CI = os.environ.get("CI", "").lower() == "true"
#: The runtimes `make test` installs (extras test, deploy): each must time here; in CI a missing one is a failure.
INSTALLED = {"eager": "torch", "compile": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def require(package: str) -> None:
    """Skip without ``package``, except in CI (CI=true), where `make test` has installed it: a failure there."""
    if importlib.util.find_spec(package) is None:
        message = f"{package} is not installed (pip install -e '.[test,deploy]' installs it)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


class Net(nn.Module):
    """conv -> BN -> ReLU, then ``depth`` gateable conv -> BN -> ReLU layers of ``width`` channels, pool, linear."""

    def __init__(self, width: int, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                                  nn.BatchNorm2d(width), nn.ReLU()) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def x32(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def converted(width: int, depth: int) -> nn.Module:
    """A seeded :class:`Net` with a ResConv gate on each of its ``depth`` body layers."""
    torch.manual_seed(0)
    model = Net(width, depth).eval()
    resconv_plugin.convert(model, x32(), level="layer")
    return model


@pytest.fixture
def exports(monkeypatch) -> list:
    """Records every ONNX export (one item each) that ONNX Runtime needs; skips without it."""
    require("onnxruntime")
    done = []
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **kw: done.append(1) or real(*a, **kw))
    return done


#: Runtimes timed in a child process: after OpenVINO had run in the pytest process, the full suite died with a
#: segmentation fault (exit 139) a few tests later, at the next subprocess call, in each of three runs (core dumps: a
#: corrupted tuple free list, then a corrupted selector object, in ``subprocess.communicate``). It does not happen
#: with this one test deselected, nor in short scripts that run OpenVINO and then fork; the cause is not found.
ISOLATED = ("openvino",)


def check_ranking(runtime: str) -> None:
    """The narrow and the wide :class:`Net` timed in turns in ``runtime``: the wide one is slower; one model alone
    gives a positive number of seconds; the cost describes itself."""
    torch.manual_seed(0)
    narrow, wide = Net(4).eval(), Net(32).eval()
    cost = LatencyCost(runtime, threads=1, repeats=7, warmup=2)
    times = cost.compare({"narrow": narrow, "wide": wide}, x32())
    assert times["wide"] > times["narrow"] > 0, times
    assert cost(narrow, x32()) > 0
    record = cost.as_dict()
    assert record["runtime"] == runtime and record["threads"] == 1 and record["batch_size"] == 1
    assert record["device"] == "cpu" and record["version"]
    assert cost.describe().startswith(f"{runtime} {record['version']}, batch 1, 1 thread")


@pytest.mark.parametrize("runtime", list(INSTALLED))
def test_each_installed_runtime_ranks_a_model_eight_times_wider_slower(runtime):
    """The same network at 4 and at 32 channels (64 times the FLOPs in its body): timed in turns in each runtime,
    the wide one is slower; one model alone gives a positive number of seconds (OpenVINO in a child process)."""
    require(INSTALLED[runtime])
    if runtime not in ISOLATED:
        check_ranking(runtime)
        return
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import test_latency_cost; test_latency_cost.check_ranking({runtime!r}); print('ranked')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ranked"), done.stderr[-3000:]


def test_batch_size_repeats_the_first_sample_and_none_keeps_the_example():
    x = torch.randn(3, 3, 8, 8)
    assert LatencyCost(batch_size=4).inputs(x)[0].shape == (4, 3, 8, 8)
    assert torch.equal(LatencyCost(batch_size=4).inputs(x)[0][3], x[0])
    assert LatencyCost(batch_size=None).inputs(x)[0].shape == (3, 3, 8, 8)
    assert LatencyCost(channels_last=True).inputs(x)[0].is_contiguous(memory_format=torch.channels_last)


def test_threads_are_set_while_timing_and_restored_after():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x + 1

    before = torch.get_num_threads()
    LatencyCost("eager", threads=1, repeats=2, warmup=1)(Probe(), torch.zeros(1, 2))
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_a_lookup_table_exports_each_model_once(exports):
    """ONNX Runtime: the full model is exported once for all its pairs, each removal once (N gates: N singles, the
    all-removed variant and the full model), however many timing rounds; a later measured set adds one export."""
    model, x = converted(8, depth=3), x32()
    names = list(resconv_plugin.gated_modules(model))
    assert len(names) == 3
    cost = LatencyCost("onnxruntime", threads=1, repeats=3, warmup=1)
    table, full = latency_table(model, names, (x,), cost=cost)
    assert set(table) == set(names) and full > 0
    assert len(exports) == len(names) + 2
    for _ in range(3):  # a set measured three times (the latency fit's median of three)
        measured_saving(model, names[:2], (x,), cost=cost)
    assert len(exports) == len(names) + 3  # the set once; the full model's export is reused
    with torch.no_grad():
        model.body[0][0].conv.weight.mul_(2)  # the model changed in place: exported again
    cost(model, x)
    assert len(exports) == len(names) + 4


def test_unknown_runtime_and_bad_settings_name_what_is_allowed():
    with pytest.raises(ValueError, match="runtime must be one of eager, compile, onnxruntime, openvino, tensorrt, "
                                         "got 'tflite'"):
        LatencyCost("tflite")
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        LatencyCost(batch_size=0)
    with pytest.raises(ValueError, match="threads must be a positive int or None, got -1"):
        LatencyCost(threads=-1)
    with pytest.raises(ValueError, match="channels_last is a PyTorch memory format"):
        LatencyCost("onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="times on the CPU here"):
        LatencyCost("openvino", device="cuda")
    with pytest.raises(TypeError, match="models must be a non-empty mapping"):
        LatencyCost().compare([Net(4)], x32())


@pytest.mark.parametrize("runtime, module, extra", [("onnxruntime", "onnxruntime", "deploy"),
                                                    ("onnxruntime", "onnxscript", "deploy"),
                                                    ("openvino", "openvino", "openvino")])
def test_a_missing_runtime_names_the_extra_to_install(monkeypatch, runtime, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"runtime='{runtime}'\) needs the package '{module}': pip install "
                                          rf"'resconv-plugin\[{extra}\]'"):
        LatencyCost(runtime)


def test_tensorrt_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, and torch.cuda.is_available\\(\\) is False"):
        LatencyCost("tensorrt")


def test_layer_pruner_times_its_table_and_fit_in_the_runtime_given():
    """A latency budget planned in ONNX Runtime: the table and the fit's measurements go through the LatencyCost,
    the fit and the state record the runtime, and a state timed in another runtime is refused."""
    require("onnxruntime")
    model, x = converted(32, depth=3), x32()
    cost = LatencyCost("onnxruntime", threads=1, repeats=5, warmup=1)
    pruner = LayerPruner(model, x, latency_reduction=0.2, latency_cost=cost)
    assert pruner.latency_cost is cost and pruner.latency_repeats == 5
    chosen = pruner.select()
    assert chosen and pruner.latency_fit["latency"]["runtime"] == "onnxruntime"
    state = pruner.state_dict()
    assert state["latency"]["runtime"] == "onnxruntime"
    with pytest.raises(ValueError, match="timed with runtime 'onnxruntime', batch_size 1; this pruner times with "
                                         "runtime 'eager'"):
        LayerPruner(model, x, latency_reduction=0.2, state=state)
    with pytest.raises(ValueError, match="latency_device and a LatencyCost .* both say how to time"):
        LayerPruner(model, x, latency_reduction=0.2, latency_cost=cost, latency_device="cuda")
    # without a LatencyCost: eager PyTorch at the example's batch, from the older arguments
    legacy = LayerPruner(model, x, flops_reduction=0.2, latency_repeats=3, latency_channels_last=True)
    assert legacy.latency_cost.as_dict() | {"version": None, "threads": None} == {
        "runtime": "eager", "version": None, "threads": None, "batch_size": None, "device": "cpu",
        "channels_last": True, "repeats": 3}


def test_joint_planner_takes_a_latency_cost_and_exports_each_try_once(exports):
    """``cost=LatencyCost(...)`` is the latency cost timed with it; the bisection's repeated measurements of one try
    export it once, and the baseline once for all."""
    model, x = converted(16, depth=2), x32()
    cost = LatencyCost("onnxruntime", threads=1, repeats=3, warmup=1)
    planner = JointPlanner(model, x, 0.3, calibration_inputs=torch.randn(4, 3, 32, 32), cost=cost)
    assert planner.cost == "latency" and planner.latency_cost is cost
    candidate = planner.structure(list(resconv_plugin.gated_modules(model))[:1], 0.0)
    rel = [planner.cost_rel(candidate) for _ in range(3)]
    assert all(r > 0 for r in rel) and len(exports) == 2
    with pytest.raises(ValueError, match="cost is a LatencyCost and latency_cost is another"):
        JointPlanner(model, x, 0.3, calibration_inputs=x, cost=cost, latency_cost=LatencyCost())


def test_compress_times_and_records_the_runtime_it_is_given(tmp_path):
    """`compress` with latency_runtime="onnxruntime": the report times every stage in ONNX Runtime and records the
    runtime, its version, threads and batch size next to the figures (report.json and report.md)."""
    require("onnxruntime")
    from resconv_plugin.workflow import CompressionConfig, compress
    from test_workflow import tiny_data

    config = CompressionConfig(model="cifar_resnet20", epochs=0, sparsity_epochs=0, finetune_epochs=0, batch_size=32,
                               flops_reduction=0.3, level="block", importance="magnitude", latency_repeats=2,
                               latency_runtime="onnxruntime", latency_threads=1, output=tmp_path / "run",
                               plots=False, progress=False)
    report = compress(config, data=tiny_data())
    latency = report["latency"]
    assert latency["runtime"] == "onnxruntime" and latency["threads"] == 1 and latency["batch_size"] == 1
    assert latency["version"] == __import__("onnxruntime").__version__ and latency["device"] == "cpu"
    assert all(r["latency_ms"] > 0 for r in report["stages"])
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["latency"] == latency and saved["settings"]["latency_runtime"] == "onnxruntime"
    assert f"CPU latency ms (onnxruntime {latency['version']}, batch 1, 1 thread)" in (
        tmp_path / "run" / "report.md").read_text()


def test_command_options_and_report_runtime(tmp_path, capsys):
    """`resconv compress --latency-runtime/--latency-batch-size/--latency-threads` fill the config (defaults:
    eager, batch 1, the runtime's threads); `resconv report --runtime` times in that runtime and says so."""
    require("onnxruntime")
    from resconv_plugin.cli import main, parse_compress_args
    from resconv_plugin.workflow.config import ConfigError

    c = parse_compress_args(["compress", "--model", "cifar_resnet20"])
    assert (c.latency_runtime, c.latency_batch_size, c.latency_threads) == ("eager", 1, None)
    c = parse_compress_args(["compress", "--model", "cifar_resnet20", "--latency-runtime", "onnxruntime",
                             "--latency-batch-size", "8", "--latency-threads", "2"])
    assert (c.latency_runtime, c.latency_batch_size, c.latency_threads) == ("onnxruntime", 8, 2)
    with pytest.raises(ConfigError, match="latency_batch_size \\(--latency-batch-size\\) must be a positive int"):
        parse_compress_args(["compress", "--model", "cifar_resnet20", "--latency-batch-size", "0"])
    model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    path = resconv_plugin.save(resconv_plugin.deployed(model), tmp_path / "m.safetensors")
    assert main(["report", str(path), "--input-size", "1", "28", "28", "--runtime", "onnxruntime",
                 "--latency-threads", "1", "--latency-repeats", "2", "--json", str(tmp_path / "f.json")]) == 0
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["latency"]["runtime"] == "onnxruntime" and figures["latency"]["threads"] == 1
    assert "CPU latency ms (onnxruntime" in capsys.readouterr().out


def test_the_pipeline_times_onnx_runtimes_on_the_cpu_and_checks_the_runtime_first(tmp_path, monkeypatch):
    """The run's LatencyCost: its runtime, batch size and threads; ONNX Runtime on the CPU whatever the training
    device; an unknown runtime, or TensorRT without CUDA, refused before any work."""
    require("onnxruntime")
    import dataclasses

    from resconv_plugin.workflow import CompressionConfig, Pipeline
    from resconv_plugin.workflow.config import ConfigError
    from test_workflow import tiny_data

    config = CompressionConfig(model="cifar_resnet20", epochs=0, latency_reduction=0.3, latency_runtime="onnxruntime",
                               latency_batch_size=2, latency_threads=1, output=tmp_path / "run", progress=False)
    pipeline = Pipeline(config.validated(), data=tiny_data())
    pipeline.device = torch.device("cuda", 1)  # a run on the second GPU: only the cost below is built
    cost = pipeline.latency_cost()
    assert (cost.runtime, cost.batch_size, cost.threads, cost.device) == ("onnxruntime", 2, 1, torch.device("cpu"))
    assert pipeline.latency_cost(50).repeats == 50
    with pytest.raises(ConfigError, match="latency_runtime \\(--latency-runtime\\) must be one of eager, compile, "
                                          "onnxruntime, openvino, tensorrt, got 'tvm'"):
        dataclasses.replace(config, latency_runtime="tvm").validated()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--latency-runtime tensorrt: .*needs a CUDA GPU"):
        Pipeline(dataclasses.replace(config, latency_runtime="tensorrt", latency_threads=None).validated(),
                 data=tiny_data())
