"""count_flops: exact counts on a hand-computable net, fused == plain-built, per-layer attribution."""

import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import resconv_plugin
import resconv_plugin.integrations.timm  # (the core no longer imports the host glue: import what you use)
from helpers import randomize_bn


class TinyNet(nn.Module):
    """conv3x3 (2->2) -> BN -> ReLU -> + x -> maxpool 2 -> global avg pool -> linear 2->3."""

    def __init__(self, plain: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=plain)
        self.bn = nn.Identity() if plain else nn.BatchNorm2d(2)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x))) + x
        return self.fc(self.gap(self.pool(x)).flatten(1))


X = torch.randn(1, 2, 8, 8)  # 128 elements
CONV = 8 * 8 * 2 * 2 * 9     # output elements x (in_channels / groups) x kernel area = 2304 multiply-adds
BN = 2 * 128                 # fvcore: 2 flops per element for an eval BatchNorm with affine parameters
RELU = ADD = 128             # 1 per output element
MAXPOOL = 2 * 4 * 4 * 4      # 32 output elements x kernel area 4
GAP = 32                     # 1 per input element
FC = 2 * 3                   # multiply-adds, bias not counted (fvcore)
GATE = 3 * 128               # ResConv: gamma * y, (1 - gamma) * x, and their sum; the scalar 1 - gamma counts 0


def test_hand_computed_total_and_layers():
    report = resconv_plugin.count_flops(TinyNet(), X)
    assert report.total == CONV + BN + RELU + ADD + MAXPOOL + GAP + FC == 2982
    assert report.by_layer == {"conv": CONV, "bn": BN, "act": RELU, "pool": MAXPOOL, "gap": GAP, "fc": FC}
    assert report.total - sum(report.by_layer.values()) == ADD  # the residual add belongs to TinyNet.forward
    assert report.params == 2 * 2 * 9 + 2 * 2 + 2 * 3 + 3
    assert report.unsupported == {}
    assert "total" in report.table() and "2,982" in str(report)


def test_converted_and_fused_counts():
    model = TinyNet()
    resconv_plugin.convert(model, X)
    converted = resconv_plugin.count_flops(model, X)
    assert converted.by_layer["conv"] == CONV + BN + GATE  # a ResConv counts whole: conv, BN, gate
    assert converted.total == 2982 + GATE
    fused = resconv_plugin.fuse(model.eval())
    plain = TinyNet(plain=True)
    fused_report, plain_report = resconv_plugin.count_flops(fused, X), resconv_plugin.count_flops(plain, X)
    assert fused_report.total == plain_report.total == CONV + RELU + ADD + MAXPOOL + GAP + FC
    assert fused_report.by_layer == plain_report.by_layer
    assert fused_report.params == plain_report.params


def plain_built(model: nn.Module) -> nn.Module:
    """The same timm architecture built plain: each conv that resconv_plugin would convert is folded with its BN by
    torch's own fuse_conv_bn_eval (independent of our fusion code) and the BN slot becomes Identity."""
    plain = copy.deepcopy(model).eval()
    report = resconv_plugin.convert(copy.deepcopy(model), torch.randn(1, 3, 64, 64))
    for layer in report.converted:
        conv, bn = plain.get_submodule(layer.name), plain.get_submodule(layer.norm)
        _, tail = resconv_plugin.integrations.timm.split_norm_act(bn)
        parent, _, child = layer.name.rpartition(".")
        setattr(plain.get_submodule(parent), child, fuse_conv_bn_eval(conv, bn))
        parent, _, child = layer.norm.rpartition(".")
        setattr(plain.get_submodule(parent), child, tail)
    return plain


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_fused_equals_plain_built_timm(name):
    model = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    plain = plain_built(model)
    resconv_plugin.convert(model, x)
    fused = resconv_plugin.fuse(model)
    a, b = resconv_plugin.count_flops(fused, x), resconv_plugin.count_flops(plain, x)
    assert a.total == b.total and a.by_layer == b.by_layer and a.params == b.params
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), rtol=1e-4, atol=1e-5)


def test_count_restores_training_mode_and_bn_statistics():
    model = TinyNet().train()
    stats = model.bn.running_mean.clone()
    resconv_plugin.count_flops(model, torch.randn(4, 2, 8, 8))
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, stats)


def test_batch_size_scales_counts():
    one, four = (resconv_plugin.count_flops(TinyNet(), torch.randn(b, 2, 8, 8)).total for b in (1, 4))
    assert four == 4 * one
