"""``fold_batchnorms``: every conv -> BatchNorm pair folded, exactly, on any timm CNN; reloadable; FLOPs drop by
exactly the BatchNorms' count."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch

import resconv_plugin
from helpers import randomize_bn, rel_err


@pytest.mark.parametrize("name, folded", [("resnet18", 20), ("efficientnet_b0", 49), ("tf_efficientnet_lite0", 49),
                                          ("mobilenetv3_large_100", 46), ("cifar_resnet20", 21)])
def test_fold_every_batchnorm(name, folded, tmp_path):
    model = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    before = resconv_plugin.count_flops(model, x[:1])
    plain = copy.deepcopy(model)
    names = resconv_plugin.deploy.fold_batchnorms(plain)
    assert len(names) == folded
    assert not [m for m in plain.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert rel_err(plain(x), expected) < 1e-5
    after = resconv_plugin.count_flops(plain, x[:1])
    bn_flops = sum(n for k, n in before.by_operator.items() if "batch_norm" in k)
    assert bn_flops > 0 and after.total == before.total - bn_flops
    resconv_plugin.save(plain, tmp_path / "m.safetensors")
    code = (f"import torch, resconv_plugin; m = resconv_plugin.load({str(tmp_path / 'm.safetensors')!r}); "
            f"torch.manual_seed(0); print(m(torch.randn(2, 3, 64, 64)).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch.manual_seed(0)
    assert float(out.strip().splitlines()[-1]) == pytest.approx(plain(torch.randn(2, 3, 64, 64)).sum().item(),
                                                               rel=1e-6)


def test_fold_after_depth_pruning_and_fusion():
    model = randomize_bn(resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1)).eval()
    x = torch.randn(4, 1, 28, 28)
    resconv_plugin.LayerPruner(model, x, gate_ratio=0.5).step()
    fused = resconv_plugin.fuse(model)
    expected = fused(x)
    assert resconv_plugin.deploy.fold_batchnorms(fused)  # the stem and stage-transition convs kept their BN until here
    assert rel_err(fused(x), expected) < 1e-5
    assert resconv_plugin.deploy.fold_batchnorms(fused) == []  # nothing left
