"""The ResConv block: a conv + BatchNorm with a convex identity gate, and the rule for which convs can carry one."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin._checks import check_fraction
from resconv_plugin.nn.fusion import fuse_resconv_params
from resconv_plugin.timm_glue import NORM_ACT_TYPES, SAME_PADDING_CONVS

__all__ = ["ResConv", "Reason", "identity_compatibility", "bn_compatibility", "gate_dtype"]

# BatchNorm classes whose forward is known to be plain BatchNorm (timm's norm-act modules are split before wrapping).
_PLAIN_BN_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, _BatchNorm.forward)


_HALF = (torch.float16, torch.bfloat16)


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a gate in a model of ``dtype``: float32 for half precision (float16 / bfloat16), else the same.

    A gate moves by steps of ``lr * reg`` (about 2e-4 in proximal sparsity training), below float16's spacing near
    1 (about 1e-3): a float16 gate would never move. float32 and float64 models keep their own dtype.

    Example:
        >>> gate_dtype(torch.float16), gate_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF else dtype


class _Gated(nn.Module):
    """A module with a scalar gate ``gamma`` that stays float32 when the model is cast to half precision
    (``.half()``, ``.to(torch.bfloat16)``): every cast and move of a module goes through ``_apply``."""

    gamma: nn.Parameter

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        gamma = self.gamma
        if gamma.dtype in _HALF:
            gamma.data = gamma.data.to(gate_dtype(gamma.dtype))
            if gamma.grad is not None:
                gamma.grad = gamma.grad.to(gamma.dtype)
        return result


def _conv_forward_is_plain(conv: nn.Conv2d) -> bool:
    return type(conv).forward is nn.Conv2d.forward or isinstance(conv, SAME_PADDING_CONVS)


@dataclass(frozen=True)
class Reason:
    """Why a conv cannot become a ResConv.

    Attributes:
        kind: a short category shared by all convs that fail the same way (for summaries), e.g. "stride is not 1".
        text: the full reason for this conv.
        subject: the thing involved (a module type or op), '' when none.
    """

    kind: str
    text: str
    subject: str = ""

    def __str__(self) -> str:
        return self.text


def identity_compatibility(conv: nn.Module) -> List[Reason]:
    """Why ``conv`` cannot carry an identity shortcut; an empty list when it can.

    The rule: an ``nn.Conv2d`` (or a subclass that does not change what the conv computes) with
    ``in_channels == out_channels``, stride 1, odd kernel sizes and 'same' padding (``padding = dilation * (k - 1) / 2``,
    ``padding='same'`` or timm's TF-'SAME' convs). Any ``groups`` (depthwise included) and any dilation.

    Example:
        >>> identity_compatibility(nn.Conv2d(8, 8, 3, padding=1, groups=8))
        []
        >>> [str(r) for r in identity_compatibility(nn.Conv2d(8, 16, 3, stride=2, padding=1))]
        ['stride (2, 2) is not 1', 'in_channels 8 != out_channels 16']
    """
    name = type(conv).__name__
    if not isinstance(conv, nn.Conv2d):
        return [Reason("not an nn.Conv2d", f"{name} is not an nn.Conv2d", name)]
    reasons = []
    if not _conv_forward_is_plain(conv):
        reasons.append(Reason("conv class with its own forward()",
                              f"{name} overrides Conv2d.forward (its weight is not what it applies)", name))
    if tuple(conv.stride) != (1, 1):
        reasons.append(Reason("stride is not 1", f"stride {tuple(conv.stride)} is not 1"))
    if conv.in_channels != conv.out_channels:
        reasons.append(Reason("changes the channel count",
                              f"in_channels {conv.in_channels} != out_channels {conv.out_channels}"))
    if any(k % 2 == 0 for k in conv.kernel_size):
        reasons.append(Reason("even kernel size", f"kernel size {tuple(conv.kernel_size)} is not odd (no centre tap)"))
    elif not isinstance(conv, SAME_PADDING_CONVS) and conv.padding != "same":
        same = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        if tuple(conv.padding) != same:
            reasons.append(Reason("padding changes the size",
                                  f"padding {tuple(conv.padding)} does not keep the size (needs {same})"))
    return reasons


def bn_compatibility(bn: nn.Module, channels: int, *, allow_norm_act: bool = False) -> List[Reason]:
    """Why ``bn`` cannot be the BatchNorm of a ResConv over ``channels`` channels; empty when it can.

    With ``allow_norm_act``, timm's BatchNorm + activation modules pass too (conversion splits them first).
    """
    name = type(bn).__name__
    if not isinstance(bn, _BatchNorm):
        return [Reason("not followed by a BatchNorm", f"{name} is not a BatchNorm", name)]
    reasons = []
    plain = type(bn).forward in _PLAIN_BN_FORWARDS or (allow_norm_act and isinstance(bn, NORM_ACT_TYPES))
    if not plain:
        reasons.append(Reason("BatchNorm class with its own forward()", f"{name} overrides BatchNorm.forward", name))
    if not bn.track_running_stats or bn.running_mean is None:
        reasons.append(Reason("BatchNorm without running statistics",
                              "BatchNorm has no running statistics (track_running_stats=False)"))
    if bn.num_features != channels:
        reasons.append(Reason("BatchNorm size mismatch",
                              f"BatchNorm num_features {bn.num_features} != conv out_channels {channels}"))
    return reasons


class ResConv(_Gated):
    """A conv + BatchNorm whose output is blended with its input by a layer scaling factor ``gamma``.

    ``y = gamma * bn(conv(x)) + (1 - gamma) * x`` with a scalar ``gamma`` in [0, 1] (float32 in a half-precision
    model: :func:`gate_dtype`). At ``gamma = 1`` this is exactly
    the original conv + BatchNorm; at ``gamma = 0`` it is exactly the identity, so a layer whose gate reached 0 can be
    removed without changing the network. Because the gate is convex, shrinking ``gamma`` always moves the layer toward
    the identity: no BatchNorm further down can absorb the scale (the loophole of a free shortcut weight, measured in
    the README's "How it works"). The activation that followed the BatchNorm stays outside, after the gate.

    After training, :meth:`fuse` returns one ``nn.Conv2d`` that computes the same function in eval mode.

    Args:
        conv: an ``nn.Conv2d`` with ``in_channels == out_channels``, stride 1, odd kernel and 'same' padding.
        bn: the BatchNorm that directly follows ``conv`` (with running statistics).
        init_gamma: initial gate value in [0, 1]; 1 keeps the function of ``bn(conv(x))``.

    Example:
        >>> block = ResConv(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.allclose(block.fuse()(x), block(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, init_gamma: float = 1.0) -> None:
        super().__init__()
        reasons = identity_compatibility(conv) + bn_compatibility(bn, getattr(conv, "out_channels", -1))
        if reasons:
            raise ValueError(f"cannot build a ResConv from {type(conv).__name__} + {type(bn).__name__}: "
                             + "; ".join(map(str, reasons)))
        init_gamma = _check_gamma(init_gamma)
        self.conv = conv
        self.bn = bn
        self.gamma = nn.Parameter(torch.tensor(init_gamma, dtype=gate_dtype(conv.weight.dtype),
                                               device=conv.weight.device))

    # The conv's interface, so code that inspects the layer it replaced keeps working.
    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return self.conv.kernel_size

    @property
    def groups(self) -> int:
        return self.conv.groups

    @property
    def dilation(self) -> Tuple[int, ...]:
        return self.conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma
        return gamma * self.bn(self.conv(x)) + (1.0 - gamma) * x

    @torch.no_grad()
    def fuse(self, *, training_ok: bool = False) -> nn.Conv2d:
        """Return one conv computing this block's eval-mode function (timm's ``fuse()`` protocol).

        The conv keeps the class and settings of the original (padding mode, TF-'SAME' padding, dilation, groups)
        and gets a bias. BatchNorm running statistics are folded in, so the result equals the block in eval mode.

        Args:
            training_ok: fusing a block in training mode raises a ValueError, because in training mode the block
                normalises with batch statistics and the fused conv would compute something else. Pass True to
                fuse anyway (for example to export a copy while training goes on); the result is the eval function.

        Raises:
            ValueError: the block is in training mode and ``training_ok`` is False.
        """
        if (self.training or self.bn.training) and not training_ok:
            raise ValueError(
                "ResConv.fuse() folds BatchNorm running statistics, so the fused conv computes the eval-mode function; "
                "this block is in training mode. Call model.eval() before fusing, or pass training_ok=True."
            )
        bn = self.bn
        weight, bias = fuse_resconv_params(
            self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var,
            bn.weight, bn.bias, bn.eps, self.gamma, self.conv.groups,
        )
        fused = copy.deepcopy(self.conv)
        fused.weight = nn.Parameter(weight, requires_grad=self.conv.weight.requires_grad)
        fused.bias = nn.Parameter(bias, requires_grad=self.conv.weight.requires_grad)
        fused.train(self.training)
        return fused

    def extra_repr(self) -> str:
        return f"gamma={self.gamma.item():.4g}"


def _check_gamma(value: float) -> float:
    """``init_gamma`` as a float (TypeError: not a number; ValueError: outside [0, 1])."""
    return float(check_fraction("init_gamma", value, type_error=True))
