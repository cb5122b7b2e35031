"""save / load of models pruned by anything (torch-pruning's pruners used directly, our helper, timm's
reparameterize_model), rebuilt in a fresh process; ONNX export checked in ONNX Runtime."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

import resconv_plugin
from helpers import randomize_bn
from resconv_plugin.integrations.torch_pruning import channel_pruner

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def depth_pruned_resnet18():
    """resnet18: layer gates, four set to 0 and removed, fused (plain convs again)."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    resconv_plugin.convert(model, X[:1])
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for name in ["layer1.0.conv2", "layer2.1.conv1", "layer3.1.conv2", "layer4.1.conv1"]:
            gates[name].gamma.zero_()
    resconv_plugin.LayerPruner(model, X[:1]).step()
    return resconv_plugin.fuse(model.eval())


def block_pruned_efficientnet():
    """efficientnet_b0: block gates, two blocks removed, fused."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    resconv_plugin.convert(model, X[:1], level="block")
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for name in list(gates)[1:3]:
            gates[name].gamma.zero_()
    resconv_plugin.LayerPruner(model, X[:1]).step()
    return resconv_plugin.fuse(model.eval())


def prune_directly(model, pruner_class):
    """torch-pruning's own pruner, no resconv_plugin helper: nothing is recorded on the model."""
    head = model.get_classifier()
    kwargs = dict(importance=tp.importance.BNScaleImportance()) if pruner_class is tp.pruner.BNScalePruner else \
        dict(importance=tp.importance.GroupMagnitudeImportance())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = pruner_class(model, X[:1], pruning_ratio=0.3, ignored_layers=[head], **kwargs)
        pruner.step()
    return model.eval()


CASES = {
    "r18-meta": lambda: prune_directly(depth_pruned_resnet18(), tp.pruner.MetaPruner),
    "r18-groupnorm": lambda: prune_directly(depth_pruned_resnet18(), tp.pruner.GroupNormPruner),
    "r18-bnscale": lambda: prune_directly(depth_pruned_resnet18(), tp.pruner.BNScalePruner),
    "effb0-meta": lambda: prune_directly(block_pruned_efficientnet(), tp.pruner.MetaPruner),
    "effb0-groupnorm": lambda: prune_directly(block_pruned_efficientnet(), tp.pruner.GroupNormPruner),
    "effb0-bnscale": lambda: prune_directly(block_pruned_efficientnet(), tp.pruner.BNScalePruner),
}

CHILD = """
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
import resconv_plugin
x = torch.load(sys.argv[1])
out = {}
for name, path in json.loads(sys.argv[2]).items():
    model = resconv_plugin.load(path)
    with torch.no_grad():
        torch.save(model(x), path + ".out")
"""


def test_round_trip_in_a_fresh_process_for_any_pruner(tmp_path):
    files, expected = {}, {}
    for name, make in CASES.items():
        model = make()
        with torch.no_grad():
            expected[name] = model(X)
        files[name] = str(resconv_plugin.save(model, tmp_path / f"{name}.safetensors"))
    for name, make in {"r18-helper": depth_pruned_resnet18, "effb0-helper": block_pruned_efficientnet}.items():
        helper = make()
        channel_pruner(helper, X[:1], pruning_ratio=0.3).step()
        with torch.no_grad():
            expected[name] = helper.eval()(X)
        files[name] = str(resconv_plugin.save(helper, tmp_path / f"{name}.safetensors"))
    torch.save(X, tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "x.pt"), json.dumps(files)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, path in files.items():
        torch.testing.assert_close(torch.load(path + ".out"), expected[name], rtol=0, atol=0, msg=name)
    def width(model):
        return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))

    depth_only = {"r18": width(depth_pruned_resnet18()), "effb0": width(block_pruned_efficientnet())}
    for name, path in files.items():  # the channel pruning is in every file, not only the depth pruning
        assert width(resconv_plugin.load(path)) < 0.9 * depth_only[name.split("-")[0]], name


def test_timm_reparameterize_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10))
    resconv_plugin.convert(model, X[:1])
    model = timm.utils.reparameterize_model(model.eval())
    path = resconv_plugin.save(model, tmp_path / "r.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # an ordinary file, not mkstemp's private one
    loaded = resconv_plugin.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
    assert not resconv_plugin.deploy.resconv_layers(loaded)


class Scale(nn.Module):
    """A module class outside torch / timm / resconv_plugin: save cannot describe it."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


def test_model_save_cannot_describe_raises_and_writes_nothing(tmp_path):
    model = timm.create_model("resnet18", num_classes=10).eval()
    model.layer1[0].act1 = Scale(64)
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"cannot save this model: .*module 'layer1.0.act1'.*test_save_any.Scale "
                                         r"is outside torch.nn, timm, resconv_plugin"):
        resconv_plugin.save(model, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_module_with_non_plain_attributes_cannot_be_created(tmp_path):
    model = timm.create_model("resnet18", num_classes=10).eval()
    model.layer1[0].act1 = timm.layers.create_act_layer("gelu")
    model.layer1[0].act1.helper = print  # a function: not plain data
    with pytest.raises(ValueError, match=r"module 'layer1.0.act1' \(.*GELU\) holds attributes that are not plain "
                                         r"data \(helper\)"):
        resconv_plugin.save(model, tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------------- ONNX


def onnx_cases():
    depth = depth_pruned_resnet18()
    both = depth_pruned_resnet18()
    channel_pruner(both, X[:1], pruning_ratio=0.3).step()
    torch.manual_seed(0)
    block = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    resconv_plugin.convert(block, X[:1], level="block")
    with torch.no_grad():
        resconv_plugin.gated_modules(block)["layer2.1"].gamma.zero_()
        resconv_plugin.gated_modules(block)["layer3.1"].gamma.fill_(0.4)  # a gate left unfused: export fuses it
    resconv_plugin.LayerPruner(block, X[:1]).step()
    return {"depth": depth, "depth+channel": both.eval(), "block": block.eval()}


def test_onnx_export_agrees_with_pytorch_at_two_batch_sizes(tmp_path):
    import onnxruntime  # noqa: F401  (part of the deploy extra that `make test` installs)

    mask = os.umask(0)
    os.umask(mask)
    for name, model in onnx_cases().items():
        result = resconv_plugin.export_onnx(model, X[:1], tmp_path / f"{name}.onnx")
        assert result.max_relative_error <= 1e-4 and result.checked_batches == [1, 5], name
        assert os.stat(result.path).st_mode & 0o777 == 0o666 & ~mask
        session = resconv_plugin.deploy.onnx_session(result.path)
        for batch in (1, 5):
            x = torch.randn(batch, 3, 64, 64)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            with torch.no_grad():
                want = model(x)
            assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4, (name, batch)


def test_onnx_export_bad_input(tmp_path, monkeypatch):
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="ResNet is in training mode: call model.eval"):
        resconv_plugin.export_onnx(model.train(), X[:1], tmp_path / "a.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist: create .*missing"):
        resconv_plugin.export_onnx(model.eval(), X[:1], tmp_path / "missing" / "a.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"needs the package 'onnxruntime': pip install 'resconv-plugin\[deploy\]'"):
        resconv_plugin.export_onnx(model.eval(), X[:1], tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir())


def test_resconv_export_command(tmp_path, capsys):
    from resconv_plugin.cli import main

    model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1,
                                        example_inputs=torch.zeros(1, 1, 28, 28)).eval()
    path = resconv_plugin.save(model, tmp_path / "model.safetensors")  # records the 1x28x28 input it was converted at
    assert main(["export", str(path), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "input 1x28x28, dynamic batch): ONNX Runtime agrees with PyTorch" in out and (tmp_path / "m.onnx").is_file()
    assert main(["export", str(path), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist: create" in capsys.readouterr().err


class _OnAGpu(nn.Module):
    """A deployed model as a model on a GPU behaves on this machine: it runs only after a move to the CPU (every
    module move, ``.cpu()`` / ``.to(...)``, goes through ``Module._apply``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.on_cpu = inner, False

    def _apply(self, fn, *args, **kwargs):
        self.on_cpu = fn(torch.zeros(())).device.type == "cpu"
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        if not self.on_cpu:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               "cuda:0 and cpu!")
        return self.inner(x)


class _GpuTensor(torch.Tensor):
    """An input as a CUDA tensor behaves: no ``.numpy()``; ``.cpu()`` gives a plain CPU tensor."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                        "host memory first.")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_onnx_export_of_a_model_on_a_gpu_goes_through_a_cpu_copy(tmp_path, monkeypatch):
    """export_onnx of a CUDA model used to add CPU noise to CUDA inputs and call .numpy() on CUDA tensors: the
    export, the ONNX Runtime check and the reference now run on a CPU copy of the deployed model and the inputs."""
    from resconv_plugin.deploy import onnx_export

    model = onnx_cases()["block"]
    placed = []

    def deployed_on_a_gpu(m):
        placed.append(_OnAGpu(resconv_plugin.deployed(m)))
        return placed[-1]

    monkeypatch.setattr(onnx_export, "deployed", deployed_on_a_gpu)
    x = X[:1].clone().as_subclass(_GpuTensor)
    with pytest.raises(TypeError, match="can't convert cuda:0"):
        x.numpy()
    result = resconv_plugin.export_onnx(model, x, tmp_path / "gpu.onnx")
    assert placed[0].on_cpu and result.max_relative_error <= 1e-4 and result.checked_batches == [1, 5]
