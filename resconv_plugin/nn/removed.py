"""What stands where a gated layer was removed: the identity, safe for the host's in-place ops under autograd."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RemovedLayer"]


class RemovedLayer(nn.Identity):
    """The identity in place of a removed ResConv; a copy of its input while autograd records.

    Removing a layer makes its output the very tensor it read. Host code that then writes in place, such as timm's
    ``BasicBlock`` (``x += shortcut`` right after ``conv2`` / ``bn2``, in-place ReLUs), would modify a tensor that
    autograd saved for the backward pass (a ReLU's output) and training fails with "one of the variables needed for
    gradient computation has been modified by an inplace operation". While gradients are enabled this module
    returns a copy, so fine-tuning after removal works on any host; under ``torch.no_grad`` /
    ``torch.inference_mode`` (evaluation, latency, export) it returns its input, so inference pays nothing. It is an
    ``nn.Identity`` for everything that looks for one (graph analysis, FLOP counting, save / load).

    Example:
        >>> import torch
        >>> from resconv_plugin.nn import RemovedLayer
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> RemovedLayer()(x) is x
        False
        >>> with torch.no_grad():
        ...     RemovedLayer()(x) is x
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() if torch.is_grad_enabled() else x
