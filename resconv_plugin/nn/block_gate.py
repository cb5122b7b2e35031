"""Block-level gates: ``x + gamma * F(x)`` for residual blocks with an identity shortcut."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin.nn.resconv import _check_gamma, _Gated, gate_dtype
from resconv_plugin.timm_glue import NORM_ACT_TYPES

__all__ = ["BlockGate"]


class BlockGate(_Gated):
    """Scales the output of the BatchNorm that ends a residual branch by a gate ``gamma`` in [0, 1].

    Placed on the last BatchNorm of the branch of a residual block ``act(x + F(x))``, it turns the block into
    ``act(x + gamma * F(x))`` (modules between that BatchNorm and the residual add, such as drop-path, dropout or a
    squeeze-excite ``y * gate(y)``, all map 0 to 0). At ``gamma = 1`` the block is unchanged; at ``gamma = 0`` the
    branch contributes nothing and the whole block can be removed. This reaches blocks whose inner convs change
    width (Bottleneck ResNets, inverted residuals), where layer-level ResConv cannot go.

    :meth:`fuse` folds ``gamma`` into the BatchNorm's affine parameters (exact in training and eval mode).

    Args:
        norm: the BatchNorm at the end of the residual branch (timm's BatchNormAct2d only with an identity
            activation).
        init_gamma: initial gate value in [0, 1] (float32 in a half-precision model: ``gate_dtype``).

    Example:
        >>> gate = BlockGate(nn.BatchNorm2d(4), init_gamma=0.5).eval()
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(gate.fuse()(x), 0.5 * gate.norm(x))
        True
    """

    def __init__(self, norm: nn.Module, init_gamma: float = 1.0) -> None:
        super().__init__()
        if not isinstance(norm, _BatchNorm):
            raise ValueError(f"BlockGate wraps a BatchNorm, got {type(norm).__name__}")
        act = getattr(norm, "act", None)
        if isinstance(norm, NORM_ACT_TYPES) and not isinstance(act, nn.Identity):
            raise ValueError(f"BlockGate needs a BatchNorm without activation, got {type(norm).__name__} with "
                             f"{type(act).__name__}")
        self.norm = norm
        self.gamma = nn.Parameter(torch.tensor(_check_gamma(init_gamma), dtype=_dtype(norm), device=_device(norm)))

    @property
    def num_features(self) -> int:
        return self.norm.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.norm(x)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """Return the BatchNorm with ``gamma`` folded into its scale and shift (same class, same statistics)."""
        fused = copy.deepcopy(self.norm)
        g = self.gamma.detach()
        if fused.affine:
            fused.weight.mul_(g)
            fused.bias.mul_(g)
        else:
            fused.affine = True
            fused.weight = nn.Parameter(torch.full_like(fused.running_mean, g.item()))
            fused.bias = nn.Parameter(torch.zeros_like(fused.running_mean))
        return fused

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.item():.4g}"


def _dtype(norm: nn.Module) -> torch.dtype:
    ref = norm.weight if norm.weight is not None else norm.running_mean
    return gate_dtype(ref.dtype if ref is not None else torch.get_default_dtype())


def _device(norm: nn.Module) -> torch.device:
    ref = norm.weight if norm.weight is not None else norm.running_mean
    return ref.device if ref is not None else torch.device("cpu")
