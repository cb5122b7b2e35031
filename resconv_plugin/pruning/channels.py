"""Channel pruning with torch-pruning, configured right for models holding depth gates (``channel_pruner``).

Traps handled: mutable dict defaults shared between pruners (fresh ``{}`` passed for ``in_channel_groups``,
``out_channel_groups``, ``num_heads``); building the dependency graph leaves the model in eval mode (every module's
training flag is restored); class types in ``ignored_layers`` are silently dropped by torch-pruning (they are
expanded to the matching modules here); the classifier is ignored. The gates' scalar ``gamma`` parameters are
"unwrapped parameters" to torch-pruning, which finds no dimension to prune in a 0-dim tensor and leaves them alone
(tested); its warning about them is dropped, any other warning passes.

The pruner's pruning history is recorded in the model's recipe. Build a new pruner after any module swap (depth
``step()``, ``fuse``): the graph is stale. Public as ``resconv_plugin.integrations.torch_pruning.channel_pruner``.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Union

from torch import nn

if TYPE_CHECKING:
    import torch_pruning
from resconv_plugin.fx.recipe import record_step
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, quiet_about_gates

__all__ = ["channel_pruner", "classifier_of"]


def classifier_of(model: nn.Module) -> Optional[nn.Module]:
    """timm's ``get_classifier()`` when it returns a module with parameters, else the last ``nn.Linear``."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _expand_ignored(model: nn.Module, ignored: Iterable[Union[str, nn.Module, type]]) -> List[nn.Module]:
    result = []
    for item in ignored:
        if isinstance(item, str):
            result.append(model.get_submodule(item))
        elif isinstance(item, type):
            result.extend(m for m in model.modules() if isinstance(m, item))
        elif isinstance(item, nn.Module):
            result.append(item)
        else:
            raise TypeError(f"ignored_layers entries must be names, modules or module classes, got "
                            f"{type(item).__name__}")
    return result


def channel_pruner(
    model: nn.Module,
    example_inputs: ExampleInputs,
    pruner_class: Optional[type] = None,
    *,
    importance: Any = None,
    ignored_layers: Optional[Iterable[Union[str, nn.Module, type]]] = None,
    **kwargs: Any,
) -> "torch_pruning.pruner.BasePruner":
    """A torch-pruning pruner (``MetaPruner`` by default) set up correctly for ``model``.

    Args:
        model: the model (converted, depth-pruned and/or fused: anything torch-pruning can trace).
        example_inputs: inputs for tracing.
        pruner_class: a torch-pruning pruner class, e.g. ``tp.pruner.BNScalePruner``.
        importance: a torch-pruning importance; defaults to ``BNScaleImportance`` for ``BNScalePruner``, else
            ``tp.importance.MagnitudeImportance(p=2)``.
        ignored_layers: names, modules or module classes (expanded to modules); the classifier is always added.
        **kwargs: passed to the pruner (``pruning_ratio``, ``global_pruning``, ``round_to``, ``reg``, ...).

    Returns:
        The pruner; its ``step()`` prunes channels and its history is kept in the model's recipe.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> pruner = channel_pruner(model, torch.randn(1, 3, 64, 64), pruning_ratio=0.25)
        >>> pruner.step()
    """
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    import torch_pruning as tp  # here, not at import time: ``import resconv_plugin`` stays lean

    pruner_class = pruner_class or tp.pruner.MetaPruner
    if not (isinstance(pruner_class, type) and issubclass(pruner_class, tp.pruner.BasePruner)):
        raise TypeError(f"pruner_class must be a torch-pruning pruner class, got {pruner_class!r}")
    if importance is None:
        importance = (tp.importance.BNScaleImportance() if issubclass(pruner_class, tp.pruner.BNScalePruner)
                      else tp.importance.MagnitudeImportance(p=2))
    ignored = _expand_ignored(model, ignored_layers or [])
    head = classifier_of(model)
    if head is not None and all(head is not m for m in ignored):
        ignored.append(head)
    for key in ("in_channel_groups", "out_channel_groups", "num_heads"):
        kwargs[key] = dict(kwargs.get(key) or {})  # fresh dicts: torch-pruning's defaults are shared
    flags = [(m, m.training) for m in model.modules()]
    try:
        with quiet_about_gates(model):
            pruner = pruner_class(model, inputs[0] if len(inputs) == 1 else inputs, importance=importance,
                                  ignored_layers=ignored, **kwargs)
    finally:
        for m, flag in flags:
            m.training = flag
    record_step(model, "channel_prune", history=pruner.pruning_history(),
                input_shapes=[list(t.shape) for t in inputs])
    return pruner

