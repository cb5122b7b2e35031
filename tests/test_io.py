"""save / load: a fresh process rebuilds depth-pruned and depth + channel-pruned models exactly; clear errors."""

import json
import subprocess
import sys

import pytest
import timm
import torch

import resconv_plugin
from helpers import randomize_bn
from resconv_plugin.integrations.torch_pruning import channel_pruner

X = torch.randn(2, 3, 64, 64)


def depth_pruned(name="resnet18"):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    resconv_plugin.convert(model, X, level="block")
    resconv_plugin.convert(model, X)
    gates = resconv_plugin.gated_modules(model)
    with torch.no_grad():
        for i, g in enumerate(gates.values()):
            g.gamma.fill_(0.0 if i % 3 == 0 else 0.5 + i / 100)
    resconv_plugin.LayerPruner(model, X).step()
    return model


def reload_in_subprocess(path, tmp_path, model):
    torch.save(X, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.eval()(X), tmp_path / "y.pt")
    code = (f"import torch, resconv_plugin; m = resconv_plugin.load({str(path)!r}); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); y = torch.load({str(tmp_path / 'y.pt')!r}); "
            "assert not m.training; out = m(x); print(torch.equal(out, y), (out - y).abs().max().item())")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_depth_pruned_roundtrip(tmp_path):
    model = depth_pruned()
    path = resconv_plugin.save(model, tmp_path / "depth.safetensors")
    assert reload_in_subprocess(path, tmp_path, model)[0] == "True"
    ops = [s["op"] for s in resconv_plugin.deploy.read_recipe(path)["steps"]]
    assert ops == ["convert", "convert", "remove"]


def test_depth_and_channel_pruned_roundtrip(tmp_path):
    model = resconv_plugin.fuse(depth_pruned().eval())
    pruner = channel_pruner(model, X, pruning_ratio=0.3)
    pruner.step()
    path = resconv_plugin.save(model, tmp_path / "both.safetensors")
    recipe = resconv_plugin.deploy.read_recipe(path)
    assert [s["op"] for s in recipe["steps"]] == ["convert", "convert", "remove", "fuse", "channel_prune"]
    assert recipe["model"] == {"name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 3}}
    assert len(recipe["steps"][-1]["history"]) > 0
    assert reload_in_subprocess(path, tmp_path, model)[0] == "True"


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "m.safetensors"
    resconv_plugin.save(model, path)
    first = path.read_bytes()
    with pytest.raises(ValueError):
        resconv_plugin.save(torch.nn.Conv2d(1, 1, 1), path)  # no architecture name: nothing written
    assert path.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_reports_are_written_atomically_with_ordinary_permissions(tmp_path, monkeypatch):
    import os

    from resconv_plugin.workflow.report import write_text_atomic

    path = tmp_path / "sub" / "report.json"
    write_text_atomic(path, "first")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "first"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600

    def failing_write(self, text):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "second")
    monkeypatch.undo()
    assert path.read_text() == "first"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resconv_plugin.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        resconv_plugin.load(corrupt)

    good = resconv_plugin.save(timm.create_model("resnet18", num_classes=10), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated|corrupt"):
        resconv_plugin.load(truncated)

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def rewrite(path, recipe=None, state=None):
        with safe_open(str(good), "pt") as f:
            meta = dict(f.metadata())
        if recipe is not None:
            meta["resconv_recipe"] = json.dumps(recipe)
        save_file(state if state is not None else load_file(str(good)), str(path), metadata=meta)
        return path

    recipe = resconv_plugin.deploy.read_recipe(good)
    unknown = rewrite(tmp_path / "unknown.safetensors", dict(recipe, model={"name": "resnet_9000", "kwargs": {}}))
    with pytest.raises(ValueError, match="'resnet_9000', which timm does not know.*close: resnet"):
        resconv_plugin.load(unknown)
    state = load_file(str(good))
    state["fc.weight"] = torch.zeros(5, 512)
    mismatched = rewrite(tmp_path / "mismatched.safetensors", state=state)
    with pytest.raises(ValueError, match=r"weights do not match.*fc.weight: file \(5, 512\) vs model \(10, 512\)"):
        resconv_plugin.load(mismatched)
    v1 = {k: v for k, v in recipe.items() if k != "structure"}
    bad_step = rewrite(tmp_path / "badstep.safetensors", dict(v1, format="resconv_plugin.checkpoint.v1",
                                                              steps=[{"op": "remove", "names": ["layer9"]}]))
    with pytest.raises(ValueError, match="recipe step 0 \\('remove'\\) does not apply"):
        resconv_plugin.load(bad_step)  # the first format replayed steps: still read
    entry = {"path": "layer9.conv", "class": "torch.nn.modules.conv.Conv2d", "attrs": {}, "opaque": [],
             "params": {}, "buffers": {}, "non_persistent": [], "children": []}
    bad_structure = rewrite(tmp_path / "badstructure.safetensors",
                            dict(recipe, structure=recipe["structure"] + [entry]))
    with pytest.raises(ValueError, match="module 'layer9.conv': its parent 'layer9' does not exist"):
        resconv_plugin.load(bad_structure)
    foreign = rewrite(tmp_path / "foreign.safetensors",
                      dict(recipe, structure=recipe["structure"] + [dict(entry, path="extra", **{"class": "os.system"})]))
    with pytest.raises(ValueError, match="class os.system is outside torch.nn, timm, resconv_plugin"):
        resconv_plugin.load(foreign)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(ValueError, match="without a resconv_plugin recipe"):
        resconv_plugin.load(plain)
