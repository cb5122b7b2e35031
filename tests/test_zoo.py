"""Exact fusion across the timm zoo, complete FLOP counts, and clear errors for families with no eligible layer.

Each architecture at 64x64: convert (output unchanged), randomise gates and BatchNorm statistics, fuse with
resconv_plugin.fuse and with timm.utils.reparameterize_model (both match the unfused model), count FLOPs with
nothing unsupported.
"""

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import resconv_plugin
from helpers import randomize_bn, randomize_gates, rel_err

ZOO = [
    "resnet18", "resnet50", "resnet26d", "seresnext26d_32x4d",      # resnet
    "efficientnet_b0", "tf_efficientnet_lite0", "mnasnet_100", "mixnet_s", "tinynet_e", "fbnetc_100",
    "spnasnet_100", "hardcorenas_a",                                  # efficientnet
    "mobilenetv3_small_100", "mobilenetv3_large_100", "lcnet_050",    # mobilenetv3
    "regnetx_002", "regnety_002",                                     # regnet
    "vgg11_bn",                                                       # vgg
    "densenet121", "dla34", "ghostnet_100", "rexnet_100", "hrnet_w18_small", "cspresnet50",
    "res2net50_14w_8s", "resnest14d", "skresnet18", "dpn68", "ese_vovnet19b_dw", "selecsls42b", "gernet_s",
    "xception41", "efficientvit_b0",
]

# Families with no eligible layer, and the reason the error must name.
NO_ELIGIBLE = {
    "convnext_atto": "layer_norm",             # LayerNorm after its depthwise convs
    "vgg11": "ReLU",                           # no BatchNorm at all
    "repvgg_a0": "RepVggBlock",                # blocks that fuse themselves (timm reparameterize_model)
    "mobileone_s0": "MobileOneBlock",
    "resnetv2_50x1_bit": "StdConv2d",          # weight-standardised convs + GroupNorm
    "nf_resnet26": "NormFreeBlock",            # normaliser-free, no BatchNorm
}


def test_zoo_is_broad():
    families = {type(timm.create_model(name, pretrained=False)).__module__ for name in ZOO}
    assert len(ZOO) >= 25 and len(set(ZOO)) == len(ZOO)
    assert len(families) >= 8, families


@pytest.mark.parametrize("name", ZOO)
def test_zoo_fusion_is_exact(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    randomize_bn(model, seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        report = resconv_plugin.convert(model, x)
        assert report.converted
        assert torch.equal(model(x), before)
        randomize_gates(model, seed=2)
        randomize_bn(model, seed=3)
        reference = model(x)
        fused = resconv_plugin.fuse(model)
        assert not resconv_plugin.deploy.resconv_layers(fused)
        assert rel_err(fused(x), reference) <= 1e-4
        assert rel_err(reparameterize_model(model)(x), reference) <= 1e-4
    flops = resconv_plugin.count_flops(fused, x)
    assert flops.unsupported == {}
    assert flops.total > 0


@pytest.mark.parametrize("name,reason", NO_ELIGIBLE.items())
def test_no_eligible_layer_says_why(name, reason):
    model = timm.create_model(name, num_classes=10)
    with pytest.raises(ValueError, match="no conv layer that can become a ResConv") as info:
        resconv_plugin.convert(model, torch.randn(1, 3, 64, 64))
    assert reason in str(info.value)
