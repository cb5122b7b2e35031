"""The fusion maths, in one place: stateless tensor functions.

Every function here takes and returns plain tensors; modules (``ResConv.fuse``) gather their parameters and call
these. Computation runs in float64 and the result is cast back to the dtype of the conv weight, so fusion adds no
rounding error beyond one final cast.

Notation (eval mode): a BatchNorm computes ``bn(z) = s * (z - mean) + beta`` per channel with
``s = bn_weight / sqrt(running_var + eps)``. A ResConv computes ``gamma * bn(conv(x)) + (1 - gamma) * x``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["fold_batchnorm", "add_identity", "fuse_resconv_params"]


def fold_batchnorm(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it.

    Args:
        weight: conv weight ``[C_out, C_in / groups, kH, kW]``.
        bias: conv bias ``[C_out]`` or None.
        running_mean: BatchNorm running mean ``[C_out]``.
        running_var: BatchNorm running variance ``[C_out]``.
        bn_weight: BatchNorm scale ``[C_out]`` or None (``affine=False``).
        bn_bias: BatchNorm shift ``[C_out]`` or None (``affine=False``).
        eps: BatchNorm epsilon.

    Returns:
        ``(weight, bias)`` in float64 of a conv computing ``bn(conv(x))``.

    Example:
        >>> w, b = fold_batchnorm(torch.ones(2, 2, 1, 1), None, torch.zeros(2), torch.ones(2), None, None, 0.0)
        >>> w.flatten().tolist(), b.tolist()
        ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0])
    """
    w = weight.detach().double()
    out_channels = w.shape[0]
    mean = running_mean.detach().double()
    var = running_var.detach().double()
    scale = torch.rsqrt(var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.detach().double()
    b = -mean if bias is None else bias.detach().double() - mean
    b = b * scale
    if bn_bias is not None:
        b = b + bn_bias.detach().double()
    return w * scale.reshape(out_channels, 1, 1, 1), b


def add_identity(weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """Return ``weight`` plus ``scale`` times the identity kernel (a new tensor).

    The identity kernel maps each channel to itself: output channel ``c`` reads input channel ``c``, which inside its
    group sits at slot ``c % (C / groups)``, at the kernel centre. It needs ``C_out == C_in``, odd kernel sizes and
    'same' padding (the centre tap then reads the pixel at the output position, whatever the dilation).

    Args:
        weight: conv weight ``[C, C / groups, kH, kW]`` with odd ``kH``, ``kW``.
        scale: scalar or ``[C]`` tensor, the weight of the identity.
        groups: the conv's ``groups``.

    Returns:
        The new weight, in the dtype of ``weight``.

    Example:
        >>> add_identity(torch.zeros(2, 1, 3, 3), torch.tensor(0.5), groups=2)[:, 0, 1, 1].tolist()
        [0.5, 0.5]
    """
    out_channels, in_per_group, kh, kw = weight.shape
    channels = torch.arange(out_channels, device=weight.device)
    result = weight.clone()
    scale = torch.as_tensor(scale, dtype=weight.dtype, device=weight.device).expand(out_channels)
    result[channels, channels % in_per_group, kh // 2, kw // 2] += scale
    return result


def fuse_resconv_params(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    eps: float,
    gamma: torch.Tensor,
    groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the single conv equal to ``gamma * bn(conv(x)) + (1 - gamma) * x``.

    ``W' = gamma * s * W + (1 - gamma) * I`` and ``b' = gamma * (beta + s * (bias - mean))``, where ``I`` is the
    identity kernel of :func:`add_identity`.

    Args:
        weight, bias: the conv's parameters (bias may be None).
        running_mean, running_var, bn_weight, bn_bias, eps: the BatchNorm's statistics and affine parameters.
        gamma: the scalar gate.
        groups: the conv's ``groups``.

    Returns:
        ``(weight, bias)`` cast to the dtype of ``weight``.

    Example:
        >>> w, b = fuse_resconv_params(torch.ones(1, 1, 1, 1), None, torch.zeros(1), torch.ones(1), None, None,
        ...                            0.0, torch.tensor(0.0), groups=1)
        >>> w.item(), b.item()  # gamma = 0: the identity
        (1.0, 0.0)
    """
    w, b = fold_batchnorm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    g = gamma.detach().double()
    w = add_identity(g * w, 1.0 - g, groups)
    b = g * b
    return w.to(weight.dtype), b.to(weight.dtype)
