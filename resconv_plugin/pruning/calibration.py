"""Measuring a model on a calibration batch: how far its outputs moved, its task loss, and BatchNorm re-estimation."""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin._utils import eval_mode

__all__ = ["output_divergence", "calibration_loss", "recalibrate_batchnorm", "batchnorm_statistics_kept"]


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model's output must be a tensor (or a tuple whose first item is one), got "
                        f"{type(output).__name__}")
    return output


def output_divergence(reference: object, output: object) -> float:
    """How far ``output`` moved from ``reference``, label-free.

    For classifier logits (2-D ``[batch, classes]``): the mean KL divergence ``KL(softmax(reference) ||
    softmax(output))`` in nats. For any other output: the mean squared difference.

    Example:
        >>> a = torch.tensor([[2.0, 0.0]])
        >>> output_divergence(a, a)
        0.0
    """
    ref, out = _logits(reference).detach().float(), _logits(output).detach().float()
    if ref.dim() == 2:
        return F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean").item()
    return F.mse_loss(out, ref).item()


def calibration_loss(output: object, targets: torch.Tensor) -> float:
    """The task loss (cross-entropy) of ``output`` logits against integer ``targets``."""
    logits = _logits(output).detach().float()
    if logits.dim() != 2 or targets.dim() != 1 or len(targets) != len(logits):
        raise ValueError(f"calibration_targets must be class indices [{len(logits)}] for logits [batch, classes], "
                         f"got targets {tuple(targets.shape)} for outputs {tuple(logits.shape)}")
    return F.cross_entropy(logits, targets.to(logits.device)).item()


@torch.no_grad()
@contextlib.contextmanager
def batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every BatchNorm of ``model`` when the block ends (e.g. around
    :func:`recalibrate_batchnorm` on a variant that is only measured)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [(m, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def recalibrate_batchnorm(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``inputs`` (one forward pass).

    Only the BatchNorms run in training mode (dropout and the rest stay in eval); momentum, flags and the rest of
    the model are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    with eval_mode(model):
        saved = [(m, m.momentum) for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            model(*inputs)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
