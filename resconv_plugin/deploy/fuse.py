"""``fuse``: replace every ResConv of a model by the plain conv it equals in eval mode."""

from __future__ import annotations

import copy

from torch import nn

from resconv_plugin.nn.resconv import ResConv
from resconv_plugin.nn.block_gate import BlockGate
from resconv_plugin.fx.recipe import record_step
from resconv_plugin._utils import check_module, set_submodule

__all__ = ["fuse", "resconv_layers"]


def resconv_layers(model: nn.Module) -> dict:
    """``{name: ResConv}`` for every ResConv in ``model`` (the root included, under the name '')."""
    return {name: m for name, m in check_module(model).named_modules() if isinstance(m, ResConv)}


def fuse(model: nn.Module, inplace: bool = False, *, training_ok: bool = False) -> nn.Module:
    """Replace every :class:`ResConv` in ``model`` by one ``nn.Conv2d`` computing the same eval-mode function.

    Every :class:`BlockGate` is folded into its BatchNorm too. ``timm.utils.reparameterize_model(model)`` reaches the
    same result through their ``fuse()`` methods. Other modules are not touched (use timm's ``reparameterize_model``
    for RepVGG-style blocks too).

    Args:
        model: a model holding ResConv blocks (or a ResConv itself).
        inplace: modify ``model`` and return it; by default a deep copy is fused and returned.
        training_ok: fusion folds BatchNorm running statistics, i.e. gives the eval-mode function. A ResConv in
            training mode therefore raises a ValueError unless this is True.

    Returns:
        The fused model (``model`` itself when ``inplace``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a ResConv is in training mode and ``training_ok`` is False.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> _ = resconv_plugin.convert(model, torch.randn(1, 3, 64, 64))
        >>> fused = resconv_plugin.fuse(model.eval())
        >>> len(resconv_plugin.deploy.resconv_layers(fused))
        0
    """
    blocks = resconv_layers(model)
    if not training_ok:
        training = [name or "<root>" for name, block in blocks.items() if block.training or block.bn.training]
        if training:
            raise ValueError(
                f"{len(training)} ResConv blocks are in training mode (first: '{training[0]}'). Fusion folds BatchNorm "
                "running statistics and gives the eval-mode function: call model.eval() first, or pass training_ok=True."
            )
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, ResConv):
        return model.fuse(training_ok=training_ok)
    for name, block in resconv_layers(model).items():
        set_submodule(model, name, block.fuse(training_ok=training_ok))
    for name, gate in [(n, m) for n, m in model.named_modules() if isinstance(m, BlockGate)]:
        set_submodule(model, name, gate.fuse())
    record_step(model, "fuse")
    return model
