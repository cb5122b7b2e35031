"""Device handling: batches on the training device, mixed precision (bf16 on CPU; gates stay float32 and exactly 0),
channels-last training, the vectorised augmentation, and (on a machine with a GPU) the same on CUDA."""

import copy
import subprocess
import sys

import pytest
import timm
import torch

import resconv_plugin
from helpers import randomize_bn, rel_err
from resconv_plugin.workflow.distributed import Dist, resolve_device
from resconv_plugin.workflow.training import StageSettings, evaluate, train_stage
from resconv_plugin.data import BatchLoader, ImageData, _crop_flip

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def synthetic(n: int = 256, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageData("synthetic", (images, labels), (images[:64], labels[:64]), 10, 1, 28, (0.5,), (0.25,))


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


# ------------------------------------------------------------------------------------------------ on a GPU
@needs_cuda
def test_fusion_and_removal_exact_on_cuda():
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
