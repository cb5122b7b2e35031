"""Fusion exactness of a single ResConv, over kernel, groups, dilation, dtype, with random gates and BN statistics."""

import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from helpers import randomize_bn, rel_err
from resconv_plugin import ResConv
from resconv_plugin.nn.fusion import add_identity, fold_batchnorm, fuse_resconv_params

C = 8
GROUPS = {"groups1": 1, "groups2": 2, "groups4": 4, "depthwise": C}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_block(conv: nn.Conv2d, seed: int, dtype=torch.float32, affine=True) -> ResConv:
    torch.manual_seed(seed)
    block = ResConv(conv, nn.BatchNorm2d(conv.out_channels, affine=affine))
    randomize_bn(block, seed)
    with torch.no_grad():
        block.gamma.fill_(torch.rand(()).item())
    return block.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("groups", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_fuse_matches_block(kernel, groups, dilation, dtype):
    seed = kernel * 100 + groups * 10 + dilation
    conv = nn.Conv2d(C, C, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=groups,
                     bias=kernel % 2 == 1 and groups == 2)
    block = make_block(conv, seed, dtype)
    assert 0.0 < block.gamma.item() < 1.0
    x = torch.randn(2, C, 13, 11, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    fused = block.fuse()
    assert type(fused) is nn.Conv2d and fused.bias is not None
    assert fused.weight.dtype == dtype
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOL[dtype]


@pytest.mark.parametrize("conv", [
    nn.Conv2d(C, C, (1, 3), padding=(0, 1)),
    nn.Conv2d(C, C, (5, 3), padding=(4, 2), dilation=(2, 2), groups=4),
    nn.Conv2d(C, C, 3, padding="same", bias=False),
    nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect", groups=C),
    Conv2dSame(C, C, 5, groups=2),
], ids=["1x3", "5x3-dil2-g4", "padding-same", "reflect-dw", "timm-Conv2dSame"])
def test_fuse_other_conv_settings(conv):
    block = make_block(conv, seed=7)
    x = torch.randn(2, C, 9, 10)
    fused = block.fuse()
    assert type(fused) is type(conv) and fused.padding_mode == conv.padding_mode
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= 1e-5


def test_fuse_bn_without_affine():
    block = make_block(nn.Conv2d(C, C, 3, padding=1), seed=3, affine=False)
    x = torch.randn(2, C, 6, 6)
    with torch.no_grad():
        assert rel_err(block.fuse()(x), block(x)) <= 1e-5


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_gate_endpoints(gamma):
    """gamma = 1 is exactly bn(conv(x)); gamma = 0 is exactly the identity."""
    conv = nn.Conv2d(C, C, 3, padding=1)
    block = make_block(conv, seed=5)
    with torch.no_grad():
        block.gamma.fill_(gamma)
        x = torch.randn(2, C, 7, 7)
        expected = block.bn(block.conv(x)) if gamma == 1.0 else x
        assert torch.equal(block(x), expected)
        assert rel_err(block.fuse()(x), expected) <= 1e-6


def test_fusion_functions_by_hand():
    """fold_batchnorm and add_identity on numbers small enough to check by hand."""
    w = torch.tensor([[[[2.0]]], [[[3.0]]]])  # 2 output channels, depthwise 1x1
    fw, fb = fold_batchnorm(w, torch.tensor([1.0, 0.0]), running_mean=torch.tensor([1.0, 2.0]),
                            running_var=torch.tensor([4.0, 1.0]), bn_weight=torch.tensor([2.0, 1.0]),
                            bn_bias=torch.tensor([0.5, -1.0]), eps=0.0)
    # s = [2/2, 1/1] = [1, 1]; w' = [2, 3]; b' = s * (bias - mean) + beta = [0 + 0.5, -2 - 1]
    assert fw.flatten().tolist() == [2.0, 3.0] and fb.tolist() == [0.5, -3.0]
    ident = add_identity(torch.zeros(4, 2, 3, 3), torch.tensor(1.0), groups=2)
    assert ident.sum().item() == 4.0
    assert [ident[c, c % 2, 1, 1].item() for c in range(4)] == [1.0] * 4
    fw, fb = fuse_resconv_params(w, None, torch.zeros(2), torch.ones(2), None, None, 0.0, torch.tensor(0.25), 2)
    assert fw.flatten().tolist() == [0.25 * 2 + 0.75, 0.25 * 3 + 0.75] and fb.tolist() == [0.0, 0.0]


def test_fuse_keeps_requires_grad_and_device_dtype():
    block = make_block(nn.Conv2d(C, C, 3, padding=1), seed=2, dtype=torch.float64)
    fused = block.fuse()
    assert fused.weight.dtype == torch.float64 and fused.weight.requires_grad
    assert not fused.training


def test_resconv_exposes_conv_interface():
    conv = nn.Conv2d(C, C, 5, padding=4, dilation=2, groups=2)
    block = ResConv(conv, nn.BatchNorm2d(C))
    assert (block.in_channels, block.out_channels, block.kernel_size, block.groups, block.dilation) == \
        (C, C, (5, 5), 2, (2, 2))
    assert block.weight is conv.weight
    assert block.gamma.item() == 1.0 and block.gamma.shape == ()
    assert list(dict(block.named_parameters())) == ["gamma", "conv.weight", "conv.bias", "bn.weight", "bn.bias"]


def test_gradient_reaches_gamma():
    block = ResConv(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C))
    block(torch.randn(4, C, 5, 5)).square().mean().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs().item() > 0


@pytest.mark.parametrize("groups", [1, C])
def test_fuse_in_train_mode_requires_flag(groups):
    block = ResConv(nn.Conv2d(C, C, 3, padding=1, groups=groups), nn.BatchNorm2d(C))
    with pytest.raises(ValueError, match="training mode"):
        block.fuse()
    fused = block.fuse(training_ok=True)
    assert fused.training
    with torch.no_grad():
        x = torch.randn(2, C, 5, 5)
        assert rel_err(fused(x), block.eval()(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gates_stay_float32_in_a_half_precision_model(dtype):
    """A ``.half()`` model kept float16 gates, which the proximal step (lr x reg, about 2e-4) cannot move: 1 - 2e-4
    rounds back to 1 in float16. Gates stay float32 when the model is cast or converted in half precision; the
    activations keep the model's dtype; float64 models keep float64 gates."""
    import copy

    import resconv_plugin

    assert (torch.tensor(1.0, dtype=torch.float16) - 2e-4).item() == 1.0
    x = torch.randn(2, 1, 12, 12)
    model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=2, in_chans=1, example_inputs=x[:1],
                                        level="auto").eval()
    for m in (copy.deepcopy(model).to(dtype), copy.deepcopy(model).half().to(dtype)):
        gates = list(resconv_plugin.gated_modules(m).values())
        assert gates and all(g.gamma.dtype == torch.float32 for g in gates)
        assert all(p.dtype == dtype for n, p in m.named_parameters() if not n.endswith("gamma"))
        gamma = gates[0].gamma
        with torch.no_grad():
            gamma.sub_(2e-4)  # one proximal step
        assert gamma.item() == pytest.approx(1 - 2e-4, rel=1e-6)
    block = ResConv(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C)).to(dtype).eval()
    assert block.gamma.dtype == torch.float32 and block.conv.weight.dtype == dtype
    if dtype == torch.bfloat16:  # CPU kernels: bfloat16 convs everywhere
        with torch.no_grad():
            assert block(torch.randn(2, C, 5, 5, dtype=dtype)).dtype == dtype
        converted = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=2, in_chans=1).to(dtype).eval()
        resconv_plugin.convert(converted, x[:1].to(dtype))
        assert all(g.gamma.dtype == torch.float32 for g in resconv_plugin.gated_modules(converted).values())
        assert resconv_plugin.deployed(converted)(x.to(dtype)).dtype == dtype
    assert block.double().gamma.dtype == torch.float64 and block.float().gamma.dtype == torch.float32
