"""Depth + channel pruning together: one training loop with both regularisers, depth step, fuse, channel step."""

import copy

import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

import resconv_plugin
from resconv_plugin.integrations.torch_pruning import channel_pruner


def flops(model, x):
    return resconv_plugin.count_flops(resconv_plugin.fuse(copy.deepcopy(model).eval()), x).total


@pytest.mark.parametrize("name,level", [("resnet18", "layer"), ("efficientnet_b0", "block")])
def test_depth_then_channel(name, level):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    resconv_plugin.convert(model, x[:1], level=level)
    base = flops(model, x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    depth = resconv_plugin.LayerPruner(model, x[:1], flops_reduction=0.15, optimizer=opt, sparsity_steps=6)
    slimming = channel_pruner(model, x[:1], tp.pruner.BNScalePruner, reg=1e-4, pruning_ratio=0.3)
    assert model.training  # building the torch-pruning graph did not leave the model in eval mode
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        depth.regularize(model)
        slimming.regularize(model)
        opt.step()
    depth.step()
    assert depth.last_step.max_abs_change == 0.0
    after_depth = flops(model, x[:1])
    assert after_depth <= (1 - 0.15) * base

    fused = resconv_plugin.fuse(model.eval())
    assert not resconv_plugin.gated_modules(fused)
    channel = channel_pruner(fused, x[:1], tp.pruner.BNScalePruner, pruning_ratio=0.3)  # a fresh graph
    channel.step()
    after_channel = resconv_plugin.count_flops(fused, x[:1]).total
    assert after_channel < 0.8 * after_depth
    assert fused(x).shape == (8, 10)
    assert isinstance(fused.get_classifier(), nn.Linear) and fused.get_classifier().out_features == 10

    further = channel_pruner(fused, x[:1], tp.pruner.MetaPruner, pruning_ratio=0.2)
    further.step()
    assert resconv_plugin.count_flops(fused, x[:1]).total < after_channel
    assert fused(x).shape == (8, 10)


def test_channel_pruner_fresh_dicts_and_ignored_classes():
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    a = channel_pruner(model, x, pruning_ratio=0.2)
    b = channel_pruner(model, x, pruning_ratio=0.2, ignored_layers=[nn.Linear, "layer4.1.conv2"])
    assert a.out_channel_groups is not b.out_channel_groups
    assert model.fc in b.ignored_layers and model.layer4[1].conv2 in b.ignored_layers
    with pytest.raises(TypeError, match="pruner_class must be a torch-pruning pruner class"):
        channel_pruner(model, x, nn.Linear)
