"""CIFAR-style VGG with BatchNorm (the network-slimming layout), registered with timm: ``cifar_vgg16_bn``.

3x3 conv -> BN -> ReLU layers with 2x2 max-pools between the five stages (four pools: the last stage keeps its
resolution, so 28x28 inputs work), global average pooling and one linear classifier. Parameters with 10 classes:
VGG-16 14.72M, VGG-19 20.04M (3 input channels).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from resconv_plugin.models._head import ClassifierHead

__all__ = ["CifarVGG"]

_CFGS = {
    "cifar_vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "cifar_vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                       512, 512, 512, 512],
}


class CifarVGG(ClassifierHead):
    """VGG for small images: ``cfg`` lists conv widths and ``"M"`` for a 2x2 max-pool.

    Args:
        cfg: the layer list.
        num_classes: classifier outputs.
        in_chans: input channels.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, **kwargs) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_chans
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)),
                           nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self._init_head(channels, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


default_cfgs = generate_default_cfgs({name: {
    "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (2, 2), "crop_pct": 1.0, "interpolation": "bilinear",
    "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616), "first_conv": "features.0",
    "classifier": "fc"} for name in _CFGS})


def _create(name: str, pretrained: bool, **kwargs) -> CifarVGG:
    if pretrained and not (kwargs.get("pretrained_cfg_overlay") or {}).get("file"):
        raise ValueError(f"{name} has no hub weights: pass pretrained_cfg_overlay=dict(file=PATH) with a local file")
    return build_model_with_cfg(CifarVGG, name, pretrained, cfg=_CFGS[name], **kwargs)


@register_model
def cifar_vgg16_bn(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-16 with BatchNorm for CIFAR (14.72M parameters)."""
    return _create("cifar_vgg16_bn", pretrained, **kwargs)


@register_model
def cifar_vgg19_bn(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 with BatchNorm for CIFAR (20.04M parameters)."""
    return _create("cifar_vgg19_bn", pretrained, **kwargs)
