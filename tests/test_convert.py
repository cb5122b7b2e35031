"""convert() on timm models: function preserved, the right layers converted, exact fusion, timm's reparameterize."""

import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import resconv_plugin
from helpers import randomize_bn, randomize_gates, rel_err
from resconv_plugin.fx.recipe import recipe_steps

MODELS = ["resnet18", "resnet50", "efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "vgg11_bn"]
INPUT = (2, 3, 64, 64)


def eligible_by_dataflow(model: nn.Module, x: torch.Tensor) -> set:
    """The eligibility rule computed independently of the library: forward hooks and tensor identity.

    A conv qualifies when its output tensor object is what a BatchNorm receives, it has in == out channels,
    stride 1, an odd kernel, and its output has the spatial size of its input.
    """
    outputs, bn_inputs = {}, set()

    def conv_hook(name):
        def hook(module, args, out):
            outputs[name] = (args[0].shape, out)
        return hook

    def bn_hook(module, args, out):
        bn_inputs.add(id(args[0]))

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, _BatchNorm):
            handles.append(m.register_forward_hook(bn_hook))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    result = set()
    for name, (in_shape, out) in outputs.items():
        conv = modules[name]
        if (id(out) in bn_inputs and conv.in_channels == conv.out_channels and conv.stride == (1, 1)
                and all(k % 2 for k in conv.kernel_size) and out.shape[-2:] == in_shape[-2:]):
            result.add(name)
    return result


@pytest.fixture(scope="module", params=MODELS)
def converted(request):
    torch.manual_seed(0)
    model = timm.create_model(request.param, num_classes=10).eval()
    randomize_bn(model, seed=1)
    x = torch.randn(INPUT)
    with torch.no_grad():
        before = model(x)
    expected = eligible_by_dataflow(model, x)
    report = resconv_plugin.convert(model, x)
    return request.param, model, x, before, expected, report


def test_convert_keeps_function_exactly(converted):
    _, model, x, before, _, _ = converted
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_converted_layers_follow_the_rule(converted):
    name, model, _, _, expected, report = converted
    assert expected, f"{name}: the independent rule finds no eligible layer"
    assert {c.name for c in report.converted} == expected
    assert set(resconv_plugin.deploy.resconv_layers(model)) == expected
    skipped = {s.name for s in report.skipped}
    all_convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not n.endswith(".conv")}
    assert skipped | expected >= all_convs - {f"{n}.conv" for n in expected}
    assert all(s.reason for s in report.skipped)


def test_report_numbers(converted):
    _, model, _, _, _, report = converted
    for layer in report.converted:
        block = model.get_submodule(layer.name)
        assert (layer.in_channels, layer.out_channels, layer.groups) == (block.in_channels, block.out_channels,
                                                                         block.groups)
        h, w = INPUT[2:]
        # every converted conv keeps the size; its FLOPs are out_elements * in_per_group * kernel area
        assert layer.flops > 0 and layer.flops % (layer.in_channels // layer.groups) == 0
        assert 0 < layer.flops_share < 1
    assert 0 < report.converted_flops_share <= 1
    assert "converted" in str(report)


def test_fused_matches_unfused_with_random_gates(converted):
    name, model, x, _, _, _ = converted
    randomize_gates(model, seed=3)
    randomize_bn(model, seed=4)
    with torch.no_grad():
        reference = model(x)
        fused = resconv_plugin.fuse(model)
        assert resconv_plugin.deploy.resconv_layers(model), "fuse(inplace=False) must not touch the input model"
        assert not resconv_plugin.deploy.resconv_layers(fused)
        assert rel_err(fused(x), reference) <= 1e-4
        timm_fused = reparameterize_model(model)
        assert not resconv_plugin.deploy.resconv_layers(timm_fused)
        assert rel_err(timm_fused(x), reference) <= 1e-4


def test_convert_twice_converts_nothing_new(converted):
    _, model, x, _, expected, _ = converted
    again = resconv_plugin.convert(model, x)
    assert again.converted == []
    assert set(again.already_converted) == expected


def test_resnet18_layers_by_name():
    model = timm.create_model("resnet18", num_classes=10)
    report = resconv_plugin.convert(model, torch.randn(1, 3, 64, 64))
    names = [c.name for c in report.converted]
    assert names == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                     "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2",
                     "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",
                     "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    # layer1 3x3 conv at 64x64 input: 16x16 map, 64 -> 64 channels: 16*16*64*64*9 MACs
    assert report.converted[0].flops == 16 * 16 * 64 * 64 * 9
    assert isinstance(model.layer1[0].bn1, nn.Identity)


def test_batchnormact_is_split_before_the_activation():
    model = timm.create_model("efficientnet_b0", num_classes=10)
    resconv_plugin.convert(model, torch.randn(1, 3, 64, 64))
    block = model.blocks[1][1]  # InvertedResidual: conv_pw -> bn1, conv_dw (3x3 depthwise, stride 1) -> bn2 (+SiLU)
    assert isinstance(block.conv_dw, resconv_plugin.ResConv)
    assert type(block.conv_dw.bn) is nn.BatchNorm2d
    assert isinstance(block.bn2, nn.Sequential) and isinstance(block.bn2[1], nn.SiLU)


def test_filter_fn_and_init_gamma():
    model = timm.create_model("resnet18", num_classes=10)
    seen = []

    def only_layer1(conv, name):
        seen.append((type(conv), name))
        return name.startswith("layer1.")

    report = resconv_plugin.convert(model, torch.randn(1, 3, 64, 64), init_gamma=0.5, filter_fn=only_layer1)
    assert [c.name for c in report.converted] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                                                  "layer1.1.conv2"]
    assert all(t is nn.Conv2d for t, _ in seen) and len(seen) == 13
    assert sum("excluded by filter_fn" in s.reason for s in report.skipped) == 9
    assert all(b.gamma.item() == 0.5 for b in resconv_plugin.deploy.resconv_layers(model).values())


def test_convert_keeps_training_mode_and_bn_statistics():
    model = timm.create_model("resnet18", num_classes=10).train()
    stats = model.layer1[0].bn1.running_mean.clone()
    resconv_plugin.convert(model, torch.randn(2, 3, 64, 64))
    assert model.training and model.layer1[0].conv1.training
    assert torch.equal(model.layer1[0].conv1.bn.running_mean, stats)


def test_conversion_report_flops_agree_with_count_flops():
    """One FLOPs definition: the per-layer FLOPs convert reports equal fvcore's count (count_flops) of each conv."""
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    by_layer = resconv_plugin.count_flops(model, x).by_layer
    report = resconv_plugin.convert(model, x)
    assert len(report.converted) == 13
    for layer in report.converted:
        assert layer.flops == by_layer[layer.name] > 0, layer.name


@pytest.mark.parametrize("name, channels, size, expected", [
    ("cifar_resnet20", 1, 28, "block"),   # reach: layer 0.93, block 0.82 of conv FLOPs
    ("resnet18", 3, 64, "block"),         # 0.86 / 0.65
    ("resnet50", 3, 64, "block"),         # 0.37 / 0.64
    ("efficientnet_b0", 3, 64, "block"),  # 0.07 / 0.56
    ("cifar_plain20", 1, 28, "layer"),    # no residual block
    ("cifar_vgg16_bn", 3, 32, "layer"),
])
def test_auto_level_takes_block_gates_where_residual_blocks_exist(name, channels, size, expected):
    x = torch.randn(2, channels, size, size)
    model = timm.create_model(name, num_classes=10, in_chans=channels).eval()
    randomize_bn(model)
    reference = model(x)
    report = resconv_plugin.convert(model, x, level="auto")
    assert report.level == expected
    assert report.converted_flops_share == pytest.approx(
        resconv_plugin.convert(copy.deepcopy(timm.create_model(name, num_classes=10, in_chans=channels)), x,
                               level=expected).converted_flops_share)
    assert rel_err(model(x), reference) < 1e-5  # init_gamma=1: the same function
    assert recipe_steps(model)[-1]["level"] == expected  # the recipe replays the chosen level, not "auto"
    again = resconv_plugin.convert(model, x, level="auto")  # stays at that level: nothing new
    assert again.converted == [] and again.level == expected


class _MostlyPlain(nn.Module):
    """A stem, ``plain`` width-keeping conv + BN + ReLU layers (layer gates only), and one residual block of
    ``block_width`` channels: block gates reach that block's two convs only."""

    def __init__(self, plain: int, width: int = 16, block_width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.plain = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                                   nn.BatchNorm2d(width), nn.ReLU()) for _ in range(plain)])
        self.down = nn.Conv2d(width, block_width, 1)  # no BatchNorm after it: not a gate site
        self.block = timm.models.resnet.BasicBlock(block_width, block_width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(block_width, 10))

    def forward(self, x):
        return self.head(self.block(self.down(self.plain(self.stem(x)))))


@pytest.mark.parametrize("plain, expected", [
    (1, "block"),  # layer gates: 1 plain conv + the block's 2 = 3 convs; block gates: 2 of them (0.67 >= 0.5)
    (2, "block"),  # 4 convs against 2: exactly the floor, 0.5
    (3, "layer"),  # 5 against 2: block gates reach 0.4 of what layer gates reach
    (0, "block"),  # only the block: 2 against 2
])
def test_auto_level_needs_block_gates_on_half_the_flops_layer_gates_reach(plain, expected):
    """``BLOCK_REACH_FLOOR``: a residual block or two in a mostly plain network does not make it a block-gated
    one (every conv here costs the same FLOPs)."""
    from resconv_plugin.fx.convert import BLOCK_REACH_FLOOR

    assert BLOCK_REACH_FLOOR == 0.5
    x = torch.randn(1, 3, 8, 8)
    model = _MostlyPlain(plain).eval()
    assert resconv_plugin.convert(model, x, level="auto").level == expected


def test_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match="level must be one of layer, block, auto, got 'blocks'"):
        resconv_plugin.convert(timm.create_model("resnet18", num_classes=10), torch.randn(1, 3, 32, 32),
                               level="blocks")
