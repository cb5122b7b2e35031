"""Every bad input gets a clear ValueError / TypeError naming the value and what is allowed."""

import numpy as np
import pytest
import timm
import torch
from torch import nn

import resconv_plugin
from resconv_plugin import ResConv
from resconv_plugin._checks import (
    NON_NEGATIVE, POSITIVE, Interval, check_bool, check_choice, check_fraction, check_int, check_number,
)

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet18", num_classes=10)


@pytest.mark.parametrize("call", [
    lambda: resconv_plugin.convert("resnet18", X),
    lambda: resconv_plugin.fuse({"conv": 1}),
    lambda: resconv_plugin.count_flops(None, X),
    lambda: resconv_plugin.count_params(3),
], ids=["convert", "fuse", "count_flops", "count_params"])
def test_not_a_module(call):
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got"):
        call()


@pytest.mark.parametrize("inputs,error,match", [
    (np.zeros((1, 3, 64, 64), dtype=np.float32), TypeError, "got ndarray"),
    ({"x": X}, TypeError, "got dict"),
    ([X, "image"], TypeError, r"example_inputs\[1\] must be a torch.Tensor, got str"),
    ((), ValueError, "example_inputs is empty"),
    (torch.randn(1, 3, 64), ValueError, r"cannot run on example_inputs of shape \(1, 3, 64\) float32"),
    (torch.randn(1, 1, 64, 64), ValueError, r"shape \(1, 1, 64, 64\).*channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.long), ValueError, "int64"),
])
@pytest.mark.parametrize("fn", [resconv_plugin.convert, resconv_plugin.count_flops], ids=["convert", "count_flops"])
def test_bad_example_inputs(resnet, fn, inputs, error, match):
    with pytest.raises(error, match=match):
        fn(resnet, inputs)


def test_bad_example_inputs_leave_model_unchanged(resnet):
    with pytest.raises(ValueError):
        resconv_plugin.convert(resnet, torch.randn(1, 3, 64))
    assert not resconv_plugin.deploy.resconv_layers(resnet)


def test_no_eligible_layer():
    with pytest.raises(ValueError, match="VGG has no conv layer that can become a ResConv: 0 of 10 convs qualify"):
        resconv_plugin.convert(timm.create_model("vgg11", num_classes=10), X)


@pytest.mark.parametrize("result", [None, 1, "yes", torch.tensor(True)], ids=["None", "int", "str", "tensor"])
def test_filter_result_must_be_bool(result):
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(TypeError, match=r"filter_fn must return a bool for each conv, got .* for 'layer1.0.conv1'"):
        resconv_plugin.convert(model, X, filter_fn=lambda conv, name: result)
    assert not resconv_plugin.deploy.resconv_layers(model)


def test_filter_must_be_callable(resnet):
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        resconv_plugin.convert(resnet, X, filter_fn="layer1")


@pytest.mark.parametrize("gamma,error", [(1.5, ValueError), (-0.1, ValueError), ("1", TypeError), (True, TypeError)])
def test_init_gamma(resnet, gamma, error):
    with pytest.raises(error, match="init_gamma"):
        resconv_plugin.convert(resnet, X, init_gamma=gamma)


@pytest.mark.parametrize("conv,bn,match", [
    (nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), r"stride \(2, 2\) is not 1"),
    (nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), "in_channels 8 != out_channels 16"),
    (nn.Conv2d(8, 8, 2), nn.BatchNorm2d(8), "not odd"),
    (nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), r"padding \(0, 0\) does not keep the size \(needs \(1, 1\)\)"),
    (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(4), "num_features 4 != conv out_channels 8"),
    (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), "no running statistics"),
    (nn.Conv2d(8, 8, 3, padding=1), nn.LayerNorm(8), "LayerNorm is not a BatchNorm"),
    (nn.Linear(8, 8), nn.BatchNorm2d(8), "Linear is not an nn.Conv2d"),
])
def test_resconv_rejects_ineligible_layers(conv, bn, match):
    with pytest.raises(ValueError, match=match):
        ResConv(conv, bn)


def test_resconv_rejects_norm_act_module():
    """timm's BatchNormAct2d runs its activation inside; convert() splits it, ResConv itself refuses it."""
    with pytest.raises(ValueError, match="BatchNormAct2d overrides BatchNorm.forward"):
        ResConv(nn.Conv2d(8, 8, 3, padding=1), timm.layers.BatchNormAct2d(8))


def test_fuse_in_training_mode():
    model = timm.create_model("resnet18", num_classes=10)
    resconv_plugin.convert(model, X)
    with pytest.raises(ValueError, match=r"13 ResConv blocks are in training mode \(first: 'layer1.0.conv1'\)"):
        resconv_plugin.fuse(model.train())
    fused = resconv_plugin.fuse(model, training_ok=True)
    assert not resconv_plugin.deploy.resconv_layers(fused) and fused.training
    with pytest.raises(ValueError, match="training mode"):
        timm.utils.reparameterize_model(model)


# ------------------------------------------------------------------ the one wording of value checks (_checks.py)
@pytest.mark.parametrize("check, error, message", [
    (lambda: check_int("steps", 0, 1), ValueError, "steps must be a positive int, got 0"),
    (lambda: check_int("epochs", True), ValueError, "epochs must be an int >= 0, got True"),  # a bool is no number
    (lambda: check_int("epochs", 2.0), ValueError, "epochs must be an int >= 0, got 2.0"),
    (lambda: check_int("opset", 5, 7, optional=True), ValueError, "opset must be an int >= 7 or None, got 5"),
    (lambda: check_fraction("alpha", 1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
    (lambda: check_fraction("fade", 1.0, high_open=True), ValueError, r"fade must be in \[0, 1\), got 1.0"),
    (lambda: check_fraction("gamma", "1", type_error=True), TypeError, r"gamma must be in \[0, 1\], got '1'"),
    (lambda: check_fraction("gamma", 2, type_error=True), ValueError, r"gamma must be in \[0, 1\], got 2"),
    (lambda: check_number("t", 0, POSITIVE), ValueError, "t must be a positive number, got 0"),
    (lambda: check_number("factor", 1.0, Interval(1, low_open=True), also=(0,)), ValueError,
     "factor must be 0 or > 1, got 1.0"),
    (lambda: check_number("factor", False, Interval(1, low_open=True), also=(0,)), ValueError,
     "factor must be 0 or > 1, got False"),
    (lambda: check_number("ratio", "x", Interval(0, 1), also=("auto",)), ValueError,
     r"ratio must be auto or in \[0, 1\], got 'x'"),
    (lambda: check_choice("amp", "int8", ["bf16", "fp16"], optional=True), ValueError,
     "amp must be one of bf16, fp16 or None, got 'int8'"),
    (lambda: check_choice("in_chans", True, (1, 3)), ValueError, "in_chans must be one of 1, 3, got True"),
    (lambda: check_bool("frozen", 1), TypeError, "frozen must be a bool, got int 1"),
])
def test_value_checks_name_the_value_and_what_is_allowed(check, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        check()


def test_value_checks_return_what_they_allow():
    assert check_int("n", 3) == 3 and check_int("n", None, optional=True) is None
    assert check_fraction("f", 1) == 1 and check_fraction("f", 0.0, high_open=True) == 0.0
    assert check_number("factor", 0.0, Interval(1, low_open=True), also=(0,)) == 0.0
    assert check_number("ratio", "auto", Interval(0, 1), also=("auto",)) == "auto"
    assert check_choice("level", "block", {"layer": 1, "block": 2}) == "block"
    assert [str(i) for i in (Interval(0, 1), Interval(0, 1, True, True), NON_NEGATIVE, Interval(1, integer=True),
                             Interval(2, 8, integer=True))] == ["in [0, 1]", "in (0, 1)", ">= 0", "a positive int",
                                                                "an int in [2, 8]"]
