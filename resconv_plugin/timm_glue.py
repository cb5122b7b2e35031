"""timm glue: which modules to treat as leaves when tracing, timm's conv and norm-act variants, its fusion protocol.

Facts relied on (timm >= 1.0):

* ``timm.layers.get_notrace_modules()`` lists the modules timm's own FX feature extraction treats as leaves.
* ``BatchNormAct2d`` / ``SyncBatchNormAct`` are BatchNorm subclasses whose forward runs BN, then ``self.drop``, then
  ``self.act``. The ResConv identity term belongs between the BN part and the drop/act part, so conversion splits them.
* ``Conv2dSame`` / ``Conv2dSameExport`` pad TF-'SAME' style: at stride 1 with an odd kernel that is symmetric padding
  of ``dilation * (k - 1) / 2``, i.e. a size-preserving conv.
* ``timm.utils.reparameterize_model`` replaces every child that has ``fuse()`` by its result, else calls
  ``reparameterize()`` / ``switch_to_deploy()`` in place.
"""

from __future__ import annotations

from typing import List, Tuple, Type

from torch import nn

from timm.layers import BatchNormAct2d, get_notrace_functions, get_notrace_modules
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.norm_act import SyncBatchNormAct

__all__ = [
    "REPARAM_METHODS",
    "SAME_PADDING_CONVS",
    "NORM_ACT_TYPES",
    "tracer_leaf_modules",
    "tracer_autowrap_functions",
    "reparameterizes_itself",
    "split_norm_act",
]

#: Method names through which ``timm.utils.reparameterize_model`` fuses a module, in the order it tries them.
REPARAM_METHODS: Tuple[str, ...] = ("fuse", "reparameterize", "switch_to_deploy")

#: Conv2d subclasses whose forward pads TF-'SAME' style and then runs a plain conv.
SAME_PADDING_CONVS: Tuple[Type[nn.Conv2d], ...] = (Conv2dSame, Conv2dSameExport)

#: BatchNorm subclasses that carry dropout + activation inside (forward: BN -> drop -> act).
NORM_ACT_TYPES: Tuple[Type[nn.Module], ...] = (BatchNormAct2d, SyncBatchNormAct)


def tracer_leaf_modules() -> List[Type[nn.Module]]:
    """Module types timm marks as not traceable by torch.fx (its notrace registry)."""
    return list(get_notrace_modules())


def tracer_autowrap_functions() -> list:
    """Functions timm marks to be kept as single nodes by torch.fx."""
    return [f for f in get_notrace_functions() if callable(f)]


def reparameterizes_itself(module: nn.Module) -> bool:
    """Whether ``timm.utils.reparameterize_model`` would fuse ``module`` itself (RepVGG-style blocks and the like).

    A conv inside such a module must stay as it is: the module's own fusion code reads its conv and BN directly.
    """
    return any(callable(getattr(module, name, None)) for name in REPARAM_METHODS)


def split_norm_act(norm: nn.Module) -> Tuple[nn.BatchNorm2d, nn.Module]:
    """Split a timm norm-act module into a plain BatchNorm2d and the drop + act tail that follows it.

    The BatchNorm shares the original's parameters and buffers (no copy), so optimisers and running statistics carry
    over. Plain BatchNorm modules come back unchanged with an ``nn.Identity`` tail.

    Example:
        >>> bn, tail = split_norm_act(BatchNormAct2d(8))
        >>> type(bn).__name__, [type(m).__name__ for m in tail]
        ('BatchNorm2d', ['Identity', 'ReLU'])
    """
    if not isinstance(norm, NORM_ACT_TYPES):
        return norm, nn.Identity()
    bn = nn.BatchNorm2d(
        norm.num_features,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device="meta",
    )
    for name, param in norm.named_parameters(recurse=False):
        setattr(bn, name, param)
    for name, buf in norm.named_buffers(recurse=False):
        setattr(bn, name, buf)
    bn.train(norm.training)
    tail = nn.Sequential(getattr(norm, "drop", nn.Identity()), getattr(norm, "act", nn.Identity()))
    tail.train(norm.training)
    return bn, tail


def _drop_types() -> Tuple[Type[nn.Module], ...]:
    from timm.layers import DropBlock2d, DropPath

    return (DropPath, DropBlock2d)


def passes_through(module: nn.Module) -> bool:
    """Modules that are the identity in eval mode and map 0 to 0 in training (dropout, timm's DropPath/DropBlock)."""
    return isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d) + _drop_types())


def is_sigmoid_gate(module: nn.Module) -> bool:
    """The gate of a squeeze-excite style ``x * gate(...)`` (sigmoid, hard-sigmoid and timm's variants)."""
    return "sigmoid" in type(module).__name__.lower()


def close_model_names(name: str, n: int = 5) -> List[str]:
    """Registered timm model names closest to ``name`` (for 'did you mean' messages)."""
    import difflib

    import timm

    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.6)
