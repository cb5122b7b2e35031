"""The structural recipe a model carries: the ordered list of structure changes made to it.

``convert``, layer removal, ``fuse`` and channel pruning each append one step, so that ``resconv_plugin.load`` can
rebuild the same structure from the timm architecture before loading the weights. The recipe is a plain JSON-able
list stored on the root module; ``copy.deepcopy`` copies it with the model.
"""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

__all__ = ["RECIPE_ATTR", "recipe_steps", "record_step"]

RECIPE_ATTR = "_resconv_recipe"


def recipe_steps(model: nn.Module) -> List[Dict[str, Any]]:
    """The structure changes recorded on ``model`` so far (oldest first); a live list."""
    steps = getattr(model, RECIPE_ATTR, None)
    if steps is None:
        steps = []
        object.__setattr__(model, RECIPE_ATTR, steps)
    return steps


def record_step(model: nn.Module, op: str, **fields: Any) -> Dict[str, Any]:
    """Append one structure change ``{"op": op, **fields}`` to the recipe of ``model``."""
    step = {"op": op, **fields}
    recipe_steps(model).append(step)
    return step
