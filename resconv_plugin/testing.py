"""Checking a converted or fused model: random BatchNorm statistics and gates, and random data.

A freshly built network has BatchNorm running statistics of 0 and 1 and affine parameters of 1 and 0, and every gate
of a freshly converted one is at 1: folding and fusion bugs that such defaults hide show up once they are random.
:func:`random_image_data` stands in for a dataset where only shapes and the code path matter. The test suite and the
benchmarks use these; so can a check of your own model.

Example:
    >>> import timm, torch, resconv_plugin
    >>> from resconv_plugin.testing import randomize_bn, randomize_gates
    >>> model = randomize_bn(timm.create_model("cifar_resnet20", num_classes=10)).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> report = resconv_plugin.convert(model, x, level="layer")
    >>> expected = randomize_gates(model)(x)
    >>> torch.testing.assert_close(resconv_plugin.fuse(model)(x), expected, rtol=1e-4, atol=1e-4)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin.data import ImageData
from resconv_plugin.deploy import resconv_layers

__all__ = ["randomize_bn", "randomize_gates", "random_image_data"]


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics (mean ~ N(0, 0.25), var in [0.5, 2]) and affine parameters
    (weight in [0.5, 1.5], bias ~ N(0, 0.04)), from ``seed``; in place.

    Returns:
        ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(shape, generator=g) * 1.5 + 0.5)
            if m.weight is not None:
                m.weight.copy_(torch.rand(shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=g) * 0.2)
    return model


@torch.no_grad()
def randomize_gates(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every :class:`~resconv_plugin.ResConv` layer of ``model`` a random gate in [0, 1], from ``seed``; in
    place.

    Returns:
        ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    for block in resconv_layers(model).values():
        block.gamma.fill_(torch.rand((), generator=g).item())
    return model


def random_image_data(n: int = 256, seed: int = 0) -> ImageData:
    """``n`` random 28x28 grey images with random labels of 10 classes (Fashion-MNIST's shapes), from ``seed``; the
    validation split is the first 64 of them.

    Example:
        >>> data = random_image_data(100)
        >>> len(data), data.num_classes, tuple(data.val[0].shape)
        (100, 10, (64, 1, 28, 28))
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageData("synthetic", (images, labels), (images[:64], labels[:64]), 10, 1, 28, (0.5,), (0.25,))
