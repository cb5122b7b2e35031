"""CIFAR-style ResNets and plain nets (He et al. 2016, Sec. 4.2), registered with timm.

``timm.create_model("cifar_resnet56")``; ``cifar_plain20`` / ``cifar_plain56`` are the same networks without the
residual adds (the deep plain networks the paper trains with ResConv).

A 3x3 stem (16 channels), three stages of ``n`` BasicBlocks with 16 / 32 / 64 channels, global average pooling and a
linear classifier: depth ``6n + 2``. Stage transitions use, by default, a 1x1 conv + BN projection shortcut
("option B", as in torch-pruning's CIFAR benchmarks: torch-pruning cannot trace the zero-padding of "option A");
``downsample="A"`` gives the parameter-free original. Parameters (B / A): ResNet-20 0.272M / 0.269M, ResNet-56
0.856M / 0.853M, ResNet-110 1.730M / 1.728M. Works at any input size >= 8 and any ``in_chans``.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from resconv_plugin._checks import check_choice
from resconv_plugin.models._head import ClassifierHead

__all__ = ["CifarResNet", "BasicBlock"]


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU (the timm / torchvision layout)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: bool = True,
                 downsample: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        self.has_shortcut = shortcut
        self.downsample = None
        if shortcut and (stride != 1 or in_channels != out_channels):
            self.downsample = ShortcutA(in_channels, out_channels, stride) if downsample == "A" else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.has_shortcut:
            x = x + shortcut
        return self.act2(x)


class CifarResNet(ClassifierHead):
    """CIFAR ResNet (or, with ``shortcut=False``, the plain network of the same depth).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        in_chans: input channels.
        widths: channels of the three stages.
        shortcut: False builds the plain network (no residual adds).
        downsample: stage-transition shortcut, ``"B"`` (1x1 conv + BN) or ``"A"`` (subsample + zero-pad channels).
        drop_rate: dropout before the classifier.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, widths: List[int] = (16, 32, 64),
                 shortcut: bool = True, downsample: str = "B", drop_rate: float = 0.0, **kwargs) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        check_choice("downsample", downsample, ("A", "B"))
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, shortcut,
                                 downsample) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self._init_head(channels, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def _cfg(**kwargs) -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1", "classifier": "fc", **kwargs}


_DEPTHS = {"cifar_resnet20": 20, "cifar_resnet32": 32, "cifar_resnet44": 44, "cifar_resnet56": 56,
           "cifar_resnet110": 110, "cifar_plain20": 20, "cifar_plain56": 56}
default_cfgs = generate_default_cfgs({name: _cfg() for name in _DEPTHS})


def _create(name: str, pretrained: bool, shortcut: bool = True, **kwargs) -> CifarResNet:
    if pretrained and not (kwargs.get("pretrained_cfg_overlay") or {}).get("file"):
        raise ValueError(f"{name} has no hub weights: pass pretrained_cfg_overlay=dict(file=PATH) with a local file")
    return build_model_with_cfg(CifarResNet, name, pretrained, depth=_DEPTHS[name], shortcut=shortcut, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters)."""
    return _create("cifar_resnet20", pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (0.47M parameters)."""
    return _create("cifar_resnet32", pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (0.66M parameters)."""
    return _create("cifar_resnet44", pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86M parameters)."""
    return _create("cifar_resnet56", pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (1.7M parameters)."""
    return _create("cifar_resnet110", pretrained, **kwargs)


@register_model
def cifar_plain20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Plain 20-layer CIFAR network: ResNet-20 without residual adds (0.27M parameters)."""
    return _create("cifar_plain20", pretrained, shortcut=False, **kwargs)


@register_model
def cifar_plain56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Plain 56-layer CIFAR network: ResNet-56 without residual adds (0.85M parameters)."""
    return _create("cifar_plain56", pretrained, shortcut=False, **kwargs)
