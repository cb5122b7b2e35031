"""Device handling: batches on the training device, mixed precision (bf16 on CPU; gates stay float32 and exactly 0),
channels-last training, the vectorised augmentation, the CUDA paths that a CPU can check (torch.cuda monkeypatched),
and on a machine with a GPU (skipped with the reason elsewhere): fusion exactness without TF32, quick runs, a latency
budget, fp16 with Taylor importance, channels-last, ONNX export and resumption on CUDA; with two GPUs, --device cuda:1
in one process and a 2-process NCCL run with --channel-pruning auto. ``benchmarks/gpu_check.sh`` runs them."""

import copy
import math
import subprocess
import sys

import pytest
import timm
import torch

import resconv_plugin
from helpers import randomize_bn, rel_err
from resconv_plugin.workflow.distributed import Dist, resolve_device
from resconv_plugin.workflow.training import StageSettings, evaluate, train_stage
from resconv_plugin.data import BatchLoader, _crop_flip
from resconv_plugin.testing import random_image_data

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"needs two CUDA GPUs (this machine has "
                                                                         f"{torch.cuda.device_count()})")


synthetic = random_image_data  # 28x28 grey, 10 classes (test_divergence_guard imports it from here)


def loop_crop_flip(x, pad, shifts, flips):
    """The reference: one image at a time."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for i, ((dy, dx), flip) in enumerate(zip(shifts.tolist(), flips.tolist())):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flip else crop
    return out


def test_vectorised_crop_flip_equals_per_image_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 9, 7, generator=g)
    shifts = torch.randint(0, 5, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert torch.equal(_crop_flip(x, 2, shifts, flips), loop_crop_flip(x, 2, shifts, flips))


def test_batches_and_evaluation_on_an_explicit_cpu_device():
    data = synthetic()
    x, y = next(iter(BatchLoader(data, True, 32, device="cpu")))
    assert x.device.type == "cpu" and x.dtype == torch.float32 and y.shape == (32,)
    assert resolve_device("cpu") == torch.device("cpu")
    assert Dist(device=torch.device("cpu")).all_sum(1.0, 2.0) == [1.0, 2.0]
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    assert 0.0 <= evaluate(model, data) <= 100.0
    with pytest.raises(ValueError, match="is not a device name"):
        resolve_device("tpu9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the message is for machines without")
def test_cuda_requested_without_cuda_says_so():
    with pytest.raises(ValueError, match="CUDA is not available on this machine .* use --device cpu"):
        resolve_device("cuda")


def test_bf16_autocast_on_cpu_keeps_gates_float32_and_exactly_zero():
    torch.manual_seed(0)
    data = synthetic()
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    example = torch.zeros(1, 1, 28, 28)
    resconv_plugin.convert(model, example)
    steps = len(BatchLoader(data, True, 64))
    pruner = resconv_plugin.LayerPruner(model, example, flops_reduction=0.3, sparsity_steps=steps, zero_at=0.5)
    settings = StageSettings(name="amp", epochs=1, lr=0.05, batch_size=64, progress=False, amp="bf16")
    train_stage(model, data, settings, Dist(), pruner=pruner)
    chosen = pruner.select()
    assert chosen and all(pruner.gates[n] == 0.0 for n in chosen)
    assert all(g.gamma.dtype == torch.float32 for g in resconv_plugin.gated_modules(model).values())
    with pytest.raises(ValueError, match="amp must be one of"):
        train_stage(model, data, StageSettings(name="x", epochs=1, lr=0.1, amp="int8", progress=False), Dist())


def test_channels_last_training_matches_nchw():
    torch.manual_seed(0)
    data = synthetic()
    base = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    resconv_plugin.convert(base, torch.zeros(1, 1, 28, 28))
    results = {}
    for channels_last in (False, True):
        model = copy.deepcopy(base)
        settings = StageSettings(name="fmt", epochs=1, lr=0.05, batch_size=64, progress=False,
                                 channels_last=channels_last)
        train_stage(model, data, settings, Dist())
        results[channels_last] = {k: v.float() for k, v in model.state_dict().items()}
    for key, value in results[False].items():
        torch.testing.assert_close(results[True][key], value, rtol=1e-3, atol=1e-4, msg=key)



def _pretend_two_gpus(monkeypatch) -> list:
    """torch.cuda as a machine with two GPUs reports it (nothing runs on them): returns the list that records every
    set_device / synchronize call."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("synchronize", d)))
    return calls


def test_a_named_gpu_becomes_the_current_device_in_one_process(monkeypatch):
    """--device cuda:1 without torchrun: cuda:1 is made the current device (torch.cuda.synchronize() and pinned
    copies then act on it, not on GPU 0); an index past the GPUs is a clear error."""
    from resconv_plugin.workflow.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = _pretend_two_gpus(monkeypatch)
    assert init_distributed("cuda:1").device == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1))]
    calls.clear()
    assert init_distributed("cpu").device == torch.device("cpu") and calls == []
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 GPUs \\(cuda:0 to cuda:1\\)"):
        resolve_device("cuda:2")


def test_latency_timing_waits_for_the_device_it_times(monkeypatch):
    """The clock of a latency table on cuda:1 synchronises cuda:1 (whatever device is current); a CPU clock
    synchronises nothing."""
    from resconv_plugin.measure.latency import interleaved_latencies, median_latency

    calls = _pretend_two_gpus(monkeypatch)
    median_latency(lambda: None, repeats=3, warmup=0, device="cuda:1")
    assert calls == [("synchronize", torch.device("cuda", 1))] * 6  # before and after each timed run
    calls.clear()
    interleaved_latencies({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0, device=torch.device("cuda", 1))
    assert calls == [("synchronize", torch.device("cuda", 1))] * 8
    calls.clear()
    median_latency(lambda: None, repeats=3, warmup=0, device="cpu")
    assert calls == []



def test_fp16_loss_scaler_falls_back_on_torch_before_2_3(monkeypatch):
    """pyproject allows torch >= 2.1; torch.amp.GradScaler exists from 2.3: before, fp16 on CUDA takes
    torch.cuda.amp.GradScaler, and fp16 on the CPU is refused with the versions named."""
    from resconv_plugin.workflow.training import check_amp, grad_scaler

    assert isinstance(grad_scaler("cpu"), torch.amp.GradScaler)

    class CudaScaler:
        pass

    monkeypatch.delattr(torch.amp, "GradScaler")
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", CudaScaler)
    assert isinstance(grad_scaler(torch.device("cuda", 0)), CudaScaler)
    check_amp("fp16", "cuda")
    with pytest.raises(ValueError, match="amp fp16 on cpu needs torch >= 2.3 \\(torch.amp.GradScaler\\); this is "
                                         "torch .*: use bf16, or train on a GPU"):
        grad_scaler("cpu")


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_training(tmp_path, monkeypatch):
    """--amp bf16 on a GPU older than compute capability 8.0 (V100, T4): a ConfigError from the preflight, before
    the baseline trains; on an A100 / H100 or the CPU it passes."""
    from resconv_plugin.workflow import CompressionConfig, ConfigError, Pipeline
    from resconv_plugin.workflow.training import check_amp

    capability = [(7, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match="amp bf16: Tesla V100-SXM2-16GB \\(cuda:0\\) has compute capability 7.0, "
                                         "and bfloat16 needs 8.0 or newer .*: use fp16"):
        check_amp("bf16", "cuda:0")
    check_amp("bf16", "cpu")
    check_amp("fp16", "cuda:0")
    config = CompressionConfig(model="cifar_resnet20", amp="bf16", epochs=1, output=tmp_path / "run", plots=False,
                               progress=False)
    pipeline = Pipeline(config.validated(), data=synthetic())
    pipeline.device = torch.device("cuda", 0)  # the preflight only: nothing runs there
    with pytest.raises(ConfigError, match="--amp bf16: Tesla V100"):
        pipeline._preflight()
    capability[0] = (8, 0)
    pipeline._preflight()



@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for machines without")
def test_gpu_check_script_refuses_without_a_gpu():
    """benchmarks/gpu_check.sh says there is no GPU (exit status 2) instead of failing its CUDA tests one by one."""
    import os
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "gpu_check: no CUDA GPU visible to" in run.stderr


# ------------------------------------------------------------------------------------------------ on a GPU
@pytest.fixture
def no_tf32():
    """Full float32 matmuls and convolutions for the block (TF32, on by default for cuDNN convolutions on Ampere and
    newer, rounds inputs to 10-bit mantissas: a 1e-5 exactness check would measure TF32, not the fusion)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@needs_cuda
def test_fusion_and_removal_exact_on_cuda(no_tf32):
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10)).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    resconv_plugin.convert(model, x)
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for g in gates.values():
            g.gamma.uniform_(0.2, 1.0)
        gates["layer2.1.conv1"].gamma.zero_()
        before = model(x)
    pruner = resconv_plugin.LayerPruner(model, x)
    assert pruner.step() == ["layer2.1.conv1"] and pruner.last_step.max_abs_change == 0.0
    with torch.no_grad():
        fused = resconv_plugin.deployed(model)
        assert next(fused.parameters()).is_cuda
        assert rel_err(fused(x), before) < 1e-5


@needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_compress_quick_on_cuda(tmp_path, amp):
    from helpers import require_fashion_mnist

    require_fashion_mnist()
    run = subprocess.run([sys.executable, "-m", "resconv_plugin.cli", "compress", "--model", "cifar_resnet20",
                          "--quick", "--no-progress", "--device", "cuda", "--amp", amp, "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "model.safetensors").is_file()


def _global_batchnorm_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from resconv_plugin.workflow.syncbn import GlobalBatchNorm2d

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)  # gloo all-reduces CUDA tensors too
    try:
        x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0)).cuda()
        bn = GlobalBatchNorm2d(4).cuda().train()
        y = bn(x[rank * 4:(rank + 1) * 4])
        torch.save({"y": y.cpu(), "running_mean": bn.running_mean.cpu()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_global_batchnorm_on_cuda_tensors(tmp_path):
    """GlobalBatchNorm2d (a public class) built its count on the CPU: torch.cat with CUDA sums failed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_global_batchnorm_worker, args=(2, port, str(tmp_path / "bn")), nprocs=2)
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.batch_norm(x, None, None, training=True)
    got = torch.cat([torch.load(tmp_path / f"bn.{rank}")["y"] for rank in (0, 1)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.load(tmp_path / "bn.0")["running_mean"], 0.1 * x.mean((0, 2, 3)))


def compress_on_cuda(tmp_path, device: str = "cuda", **settings) -> dict:
    """``compress`` on CUDA (joined as the command joins: init_distributed), on the synthetic data, a quick
    schedule; ``settings`` override the config."""
    from resconv_plugin.workflow import CompressionConfig, compress, init_distributed

    defaults = dict(model="cifar_resnet20", epochs=1, sparsity_epochs=1, finetune_epochs=1, batch_size=32,
                    calibration_size=64, joint_recovery_steps=8, latency_repeats=5, output=tmp_path / "run",
                    plots=False, progress=False)
    config = CompressionConfig(**{**defaults, **settings})
    return compress(config, init_distributed(device), data=synthetic())


@needs_cuda
def test_latency_budget_on_cuda(tmp_path):
    """--latency-reduction with --device cuda: the preflight, the table, its fit and the report all time on the GPU
    (the preflight used to time on the CPU, pass, and the run died after training)."""
    report = compress_on_cuda(tmp_path, latency_reduction=0.3, importance="removal")
    assert report["latency_device"] == "cuda"
    fit = report["latency_fit"]
    assert fit["fraction"] == 0.3 and fit["rounds"]
    assert sorted(report["removed"]) == fit["rounds"][fit["best"]]["removed"]
    assert all(r["latency_ms"] > 0 for r in report["stages"])


@needs_cuda
def test_fp16_with_taylor_importance_on_cuda(tmp_path):
    """--amp fp16 --importance taylor: overflow steps of the loss scaler leave Taylor's sums finite."""
    report = compress_on_cuda(tmp_path, amp="fp16", importance="taylor", flops_reduction=0.3)
    assert report["removed"] and report["summary"]["flops_reduction"] >= 0.3
    assert all(math.isfinite(r["top1"]) for r in report["stages"])


@needs_cuda
def test_taylor_skips_the_overflow_steps_of_fp16_training(monkeypatch):
    """A loss scale far too large: the first steps overflow and the scaler skips them; Taylor counts exactly the
    steps whose gate gradients are finite, and ranks from finite scores."""
    from resconv_plugin.workflow import training

    scalers = []

    def huge_scale(device):
        scalers.append(torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 24))
        return scalers[-1]

    monkeypatch.setattr(training, "grad_scaler", huge_scale)
    torch.manual_seed(0)
    data = synthetic()
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).cuda()
    example = torch.zeros(1, 1, 28, 28, device="cuda")
    resconv_plugin.convert(model, example)
    steps = 3 * len(BatchLoader(data, True, 32))
    pruner = resconv_plugin.LayerPruner(model, example, importance="taylor", flops_reduction=0.3,
                                        sparsity_steps=steps)
    observed = []
    observe = pruner.importance.observe

    def watched(gates):
        finite = all(bool(torch.isfinite(g.gamma.grad).all()) for g in gates.values() if g.gamma.grad is not None)
        before = pruner.importance.state_dict()["count"]
        observe(gates)
        observed.append((finite, pruner.importance.state_dict()["count"] - before))

    pruner.importance.observe = watched
    settings = StageSettings(name="fp16", epochs=3, lr=0.05, batch_size=32, progress=False, amp="fp16",
                             divergence_factor=None)
    train_stage(model, data, settings, Dist(device=example.device), pruner=pruner)
    assert scalers and scalers[0].get_scale() < 2.0 ** 24  # steps were skipped
    assert len(observed) == steps and {finite for finite, _ in observed} == {True, False}
    assert all(counted == int(finite) for finite, counted in observed)
    scores = pruner.scores()
    assert scores and all(math.isfinite(v) for v in scores.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_cuda
def test_channels_last_run_on_cuda(tmp_path):
    """--channels-last on CUDA: training and the latency tables of a latency budget in channels-last format."""
    report = compress_on_cuda(tmp_path, channels_last=True, latency_reduction=0.2, importance="magnitude")
    assert report["settings"]["channels_last"] and report["latency_fit"]["rounds"]
    assert resconv_plugin.load(tmp_path / "run" / "model.safetensors")(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@needs_cuda
def test_export_onnx_of_a_cuda_model(tmp_path):
    """export_onnx of a model on the GPU: exported and checked from a CPU copy; the model stays on the GPU."""
    torch.manual_seed(0)
    model = randomize_bn(resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1,
                                                     example_inputs=torch.zeros(1, 1, 28, 28))).cuda().eval()
    result = resconv_plugin.export_onnx(model, torch.randn(1, 1, 28, 28, device="cuda"), tmp_path / "m.onnx")
    assert result.max_relative_error <= 1e-4 and result.checked_batches == [1, 5]
    assert all(p.is_cuda for p in model.parameters())


@needs_cuda
def test_resume_on_cuda(tmp_path, monkeypatch):
    """Interrupted after a sparsity epoch on CUDA with fp16 (optimizer, loss scaler and pruner state in the
    checkpoint, saved from the GPU, loaded on the CPU): the same call resumes at that epoch and finishes."""
    from resconv_plugin.workflow import pipeline as pipeline_module

    class Interrupted(Exception):
        pass

    save = pipeline_module.Run.save

    def save_then_stop(self, progress=None):
        save(self, progress)
        if progress and progress["stage"] == "sparsity" and progress["epoch"] == 1:
            raise Interrupted

    settings = dict(sparsity_epochs=2, amp="fp16", flops_reduction=0.3, importance="magnitude")
    monkeypatch.setattr(pipeline_module.Run, "save", save_then_stop)
    with pytest.raises(Interrupted):
        compress_on_cuda(tmp_path, **settings)
    monkeypatch.setattr(pipeline_module.Run, "save", save)
    progress = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["progress"]
    assert progress["stage"] == "sparsity" and progress["optimizer"]["state"] and progress["scaler"]
    report = compress_on_cuda(tmp_path, **settings)
    assert report["resumed"][0]["at"] == "sparsity epoch 1"
    assert [(e["stage"], e["epoch"]) for e in report["epochs"]] == [("baseline", 1), ("sparsity", 1),
                                                                    ("sparsity", 2), ("finetune", 1)]
    assert report["removed"] and report["summary"]["flops_reduction"] >= 0.3


SECOND_GPU = """
import json, sys, torch
from test_device import compress_on_cuda
from pathlib import Path
report = compress_on_cuda(Path(sys.argv[1]), device="cuda:1", latency_reduction=0.2, importance="magnitude")
print(json.dumps({"current": torch.cuda.current_device(), "latency_device": report["latency_device"],
                  "gpu0": torch.cuda.max_memory_allocated(0), "gpu1": torch.cuda.max_memory_allocated(1)}))
"""


@needs_two_gpus
def test_device_cuda_1_in_one_process(tmp_path):
    """--device cuda:1 without torchrun: everything (training, the latency table's synchronisation, pinned copies)
    on GPU 1, and not one tensor allocated on GPU 0."""
    import json
    import os
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", SECOND_GPU, str(tmp_path)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["current"] == 1 and seen["latency_device"] == "cuda:1"
    assert seen["gpu0"] == 0 and seen["gpu1"] > 0


@needs_two_gpus
@pytest.mark.parametrize("budget", [["--flops-reduction", "0.4"], ["--latency-reduction", "0.3"]],
                         ids=["flops", "latency"])
def test_two_process_nccl_run_with_channel_pruning_auto(tmp_path, budget):
    """torchrun, 2 processes, NCCL, --channel-pruning auto: rank 0 plans and measures, the others follow its plan
    (the pruned model used to be broadcast by pickling and landed on cuda:0 in both processes)."""
    import json

    from helpers import require_fashion_mnist

    require_fashion_mnist()
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "resconv_plugin.cli", "compress", "--model", "cifar_resnet20", "--quick", "--no-progress",
                          "--device", "cuda", *budget, "--channel-pruning", "auto", "--latency-repeats", "5",
                          "--no-plots", "--output", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "(2 processes)" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["baseline", "sparsity", "pruned", "channel_pruned",
                                                      "finetuned", "fused"]
    assert report["joint_plan"]["candidates"] and report["latency_device"] == "cuda:0"
    if budget[0] == "--flops-reduction":
        assert report["summary"]["flops_reduction"] >= 0.4 - 1e-9
