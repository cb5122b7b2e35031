"""The paper's networks in timm's registry, and ``resconv_plugin.create_resconv_model``."""

from __future__ import annotations

import pytest
import timm
import torch

import resconv_plugin
from helpers import randomize_bn


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, option_b, option_a, known", [
    # the well-known figures (He et al. 2016, Table 6: 0.27M / 0.85M / 1.7M) are those of option A
    ("cifar_resnet20", 272_474, 269_722, 0.27e6),
    ("cifar_resnet56", 855_770, 853_018, 0.85e6),
    ("cifar_resnet110", 1_730_714, 1_727_962, 1.7e6),
])
def test_cifar_resnet_parameter_counts(name, option_b, option_a, known):
    assert n_params(timm.create_model(name)) == option_b
    model = timm.create_model(name, downsample="A")
    assert n_params(model) == option_a
    assert abs(option_a - known) / known < 0.02


# VGG-16 by hand: conv weights 14,710,464 (3*64*9 + 64*64*9 + 64*128*9 + 128*128*9 + 128*256*9 + 2*256*256*9
# + 256*512*9 + 5*512*512*9), BN 2 * 4,224 channels, fc 512*10 + 10; VGG-19 adds 256*256*9 + 2*512*512*9 and 1,280
# BN channels. Plain nets: the option-A ResNets without any shortcut (no parameters there either).
@pytest.mark.parametrize("name, params, depth", [
    ("cifar_plain20", 269_722, 19), ("cifar_plain56", 853_018, 55),
    ("cifar_vgg16_bn", 14_724_042, 13), ("cifar_vgg19_bn", 20_035_018, 16),
])
def test_plain_and_vgg_networks(name, params, depth):
    model = timm.create_model(name)
    assert n_params(model) == params
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    grey = timm.create_model(name, num_classes=7, in_chans=1).eval()
    assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_plain_network_has_no_residual_add():
    gm = torch.fx.symbolic_trace(timm.create_model("cifar_plain20"))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds == []


@pytest.mark.parametrize("name, converted", [("cifar_resnet20", 16), ("cifar_plain56", 52), ("cifar_vgg16_bn", 9),
                                             ("resnet18", 13)])
def test_create_resconv_model_converts_and_keeps_the_function(name, converted):
    torch.manual_seed(0)
    model = resconv_plugin.create_resconv_model(name, num_classes=10)
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=10)
    assert len(model.resconv_report.converted) == converted
    randomize_bn(model, seed=1)
    randomize_bn(plain, seed=1)
    x = torch.randn(2, 3, 32, 32)
    expected = plain.eval()(x)
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resconv_plugin.fuse(model)(x), expected, rtol=1e-4, atol=1e-5)


def test_create_resconv_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'cifar_vgg16'; did you mean: cifar_vgg16_bn"):
        resconv_plugin.create_resconv_model("cifar_vgg16")
