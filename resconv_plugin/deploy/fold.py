"""``fold_batchnorms``: fold every eval-mode BatchNorm into the conv before it (the usual deployment step);
``deployed``: a copy with gates fused and BatchNorms folded.

:func:`fuse` folds the BatchNorms inside ResConv layers; this folds the rest (convs that change width or stride, the
stem, projection shortcuts) and works on any model, converted or not, depth- or channel-pruned. Benchmarks use it so
that every network compared is measured as it would be deployed.
"""

from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn

from resconv_plugin.nn.resconv import identity_compatibility
from resconv_plugin.deploy.fuse import fuse
from resconv_plugin.nn.fusion import fold_batchnorm
from resconv_plugin.fx.graph import find_conv_sites
from resconv_plugin.fx.recipe import record_step
from resconv_plugin._utils import check_module, set_submodule
from resconv_plugin.timm_glue import split_norm_act

__all__ = ["fold_batchnorms", "deployed"]


@torch.no_grad()
def fold_batchnorms(model: nn.Module, names: List[str] = None) -> List[str]:
    """Fold each BatchNorm that directly and only follows an ``nn.Conv2d`` into that conv, in place.

    The conv gains a bias; the BatchNorm is replaced by ``nn.Identity`` (a timm ``BatchNormAct2d`` by its activation).
    The model computes its eval-mode function (training-mode BatchNorm statistics are gone afterwards).

    Args:
        model: any model (traced with torch.fx as :func:`convert` does).
        names: only these convs (default: every conv that can be folded).

    Returns:
        The names of the convs that absorbed a BatchNorm.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("resnet18").eval()
        >>> len(resconv_plugin.deploy.fold_batchnorms(model))
        20
    """
    check_module(model)
    sites, _ = find_conv_sites(model)
    modules = dict(model.named_modules())
    folded = []
    for site in sites:
        if site.norm is None or (names is not None and site.name not in names):
            continue
        conv = modules[site.name]
        if any(r not in identity_compatibility(conv) for r in site.reasons):
            continue  # a reason other than the conv's shape (norm used twice, self-fusing block, no statistics...)
        bn, tail = split_norm_act(modules[site.norm])
        if bn.running_mean is None:
            continue
        weight, bias = fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                      bn.eps)
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        if type(conv) is not nn.Conv2d:  # e.g. timm's Conv2dSame: keep its class (and forward) with the new weights
            plain = conv
            plain.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype,
                                                  device=conv.weight.device))
        plain.weight.copy_(weight.to(plain.weight.dtype))
        plain.bias.copy_(bias.to(plain.bias.dtype))
        plain.train(conv.training)
        set_submodule(model, site.name, plain)
        set_submodule(model, site.norm, tail)
        folded.append(site.name)
    if folded:
        record_step(model, "fold_batchnorm", names=folded)
    return folded


def deployed(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as deployed, in eval mode: gates fused, every conv -> BatchNorm pair folded.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> from resconv_plugin.deploy.fold import deployed
        >>> model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> type(deployed(model).layer1[0].conv1).__name__
        'Conv2d'
    """
    with torch.no_grad():
        plain = fuse(copy.deepcopy(model).eval(), inplace=True)
        fold_batchnorms(plain)
    return plain.eval()
