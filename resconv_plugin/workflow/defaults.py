"""The measured-best recipe: what ``resconv compress`` and :func:`~resconv_plugin.workflow.compress` do when no
recipe option is given.

A recipe is the gate level, the importance criterion and the split of the post-baseline epochs between sparsity
training and fine-tuning. ``level="auto"`` picks block gates wherever the model has residual blocks with identity
shortcuts, layer gates otherwise (:func:`resconv_plugin.convert`); ``importance="auto"`` and unset
``sparsity_epochs`` / ``finetune_epochs`` then take that level's entry of :data:`RECIPES`. Whatever is given
explicitly wins.

Why (Fashion-MNIST, converged baselines, mean of two seeds, top-1 at equal CPU latency;
``benchmarks/results/equal_latency_summary.json``; the same 6 epochs after pruning for every column):

=================  ========  =====================  =====================  =====================
model, latency     baseline  layer, removal-iter.,  block, magnitude,      block, magnitude,
                               3 + 3 (old default)    3 + 3                  1 + 5
=================  ========  =====================  =====================  =====================
cifar_resnet56 0.6   94.64    93.63                  93.93                  94.09
cifar_resnet56 0.45  94.64    89.20                  93.61                  93.37
cifar_resnet56 0.35  94.64    13.68 (collapsed)      91.02                  92.66
cifar_resnet20 0.6   94.56    93.04                  93.26                  93.74
cifar_resnet20 0.45  94.56    88.91                  92.14                  92.43
cifar_resnet20 0.35  94.56    85.32                  88.55                  90.35
=================  ========  =====================  =====================  =====================

The block recipe keeps that level and split but chooses its blocks with ``removal-bn`` (the loss increase of
removing each block on the calibration batch, BatchNorm statistics re-estimated), once, before sparsity training
fades them out. Magnitude chooses its first set while every gate is still 1: it ties, the latency table decides
between blocks of nearly equal saving, and the command's rows with magnitude (same recipe, same code otherwise)
kept 93.02 / 91.19 / 89.21% on cifar_resnet20 at 0.6 / 0.45 / 0.35, 0.7-1.2 pt under the rows above; at 0.45 each
removed both blocks of the last stage, which ``removal-bn`` ranks the most important of the seven (0.18-0.33 nats
on either seed's calibration batch, against 0.02-0.14 for the others; without re-estimation the first block
scores 2.3 nats, a statistics shift that fine-tuning repairs).

At a FLOPs budget the block level with magnitude selection also won (50% of the FLOPs, cifar_resnet20: -1.95 pt
against -2.06 for layer gates with iterative removal; ``ablation_depth.md``). Layer gates (plain networks without
residual blocks) keep the criterion the ablation chose for them, iterative removal, and the 3 + 3 split their rows
were measured with. On EfficientNet / MobileNet blocks the recipe is not measured yet.

Example:
    >>> from resconv_plugin.workflow.defaults import RECIPES
    >>> RECIPES["block"]
    Recipe(level='block', importance='removal-bn', sparsity_epochs=1, finetune_epochs=5)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Tuple

from resconv_plugin._checks import check_choice

__all__ = ["Recipe", "RECIPES", "resolve_recipe"]


@dataclass(frozen=True)
class Recipe:
    """One gate level's default recipe.

    Attributes:
        level: ``"block"`` or ``"layer"``.
        importance: the LayerPruner criterion.
        sparsity_epochs: epochs of budget-driven sparsity training.
        finetune_epochs: epochs of fine-tuning after removal.
    """

    level: str
    importance: str
    sparsity_epochs: int
    finetune_epochs: int


#: The default recipe of each gate level (the module docstring gives the rows behind each).
RECIPES: Dict[str, Recipe] = {
    "block": Recipe("block", "removal-bn", 1, 5),
    "layer": Recipe("layer", "removal-iterative", 3, 3),
}

#: The config fields a recipe fills, and the value that means "the default".
_UNSET = {"importance": "auto", "sparsity_epochs": None, "finetune_epochs": None}


def resolve_recipe(config, level: str) -> Tuple[object, List[str]]:
    """``config`` with its unset recipe fields filled from ``RECIPES[level]``, and the names of the fields filled.

    Args:
        config: a validated :class:`~resconv_plugin.workflow.CompressionConfig`.
        level: the gate level the model was (or will be) converted at, ``"block"`` or ``"layer"``.

    Raises:
        ValueError: ``level`` is not a concrete level.

    Example:
        >>> from resconv_plugin.workflow import CompressionConfig
        >>> config = CompressionConfig(model="cifar_resnet20", finetune_epochs=8).validated()
        >>> resolved, filled = resolve_recipe(config, "block")
        >>> resolved.importance, resolved.sparsity_epochs, resolved.finetune_epochs, filled
        ('removal-bn', 1, 8, ['level', 'importance', 'sparsity_epochs'])
    """
    check_choice("level", level, RECIPES)
    recipe = RECIPES[level]
    filled = ["level"] if config.level == "auto" else []
    changes = {"level": level}
    for name, unset in _UNSET.items():
        if getattr(config, name) == unset:
            changes[name] = getattr(recipe, name)
            filled.append(name)
    return dataclasses.replace(config, **changes), filled
