"""BatchNorm with statistics over the global batch in a distributed run: torch's ``SyncBatchNorm`` on CUDA (NCCL),
our :class:`GlobalBatchNorm2d` on CPU (gloo; torch's SyncBatchNorm refuses CPU tensors).

Under ``torchrun``, every ``nn.BatchNorm2d`` of the model trains as :class:`GlobalBatchNorm2d` (the instance's class
is swapped for the stage, as ``torch.nn.utils.parametrize`` does: same parameters, buffers and state dict), so a
2-process run normalises with the statistics of the whole global batch, as one process would; the all-reduce is
differentiable, so gradients match too. Subclasses of ``nn.BatchNorm2d`` (timm's ``BatchNormAct2d``) keep per-process
statistics.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GlobalBatchNorm2d", "global_batchnorm", "synchronized_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the gradient of every input is the sum of the output gradients of all ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are all-reduced over the process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        # on x's device (a CPU count cannot join CUDA sums), in float32 at least: half-precision sums over the
        # global batch overflow (float16) or round (bfloat16), and so would the count
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), x.numel() // channels, dtype=xs.dtype, device=x.device)
        stats = torch.cat([xs.sum((0, 2, 3)), (xs * xs).sum((0, 2, 3)), count])
        stats = _AllReduceSum.apply(stats)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1).clamp_min(1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)  # as nn.BatchNorm2d: the input's dtype


@contextmanager
def global_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every exact ``nn.BatchNorm2d`` of ``model`` uses global-batch statistics."""
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if enabled else []
    for m in swapped:
        m.__class__ = GlobalBatchNorm2d
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d


@contextmanager
def synchronized_batchnorm(model: nn.Module, dist_info) -> Iterator[nn.Module]:
    """Within the block, every exact ``nn.BatchNorm2d`` normalises over the global batch of a distributed run:
    as ``nn.SyncBatchNorm`` when the run is on CUDA (same parameters, buffers and state dict; the class is swapped
    for the block), as :class:`GlobalBatchNorm2d` on CPU. Nothing changes in a single-process run."""
    if not dist_info.enabled:
        yield model
        return
    if dist_info.device.type != "cuda":
        with global_batchnorm(model):
            yield model
        return
    swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for m in swapped:
        m.__class__ = nn.SyncBatchNorm
        m.process_group = None
    try:
        yield model
    finally:
        for m in swapped:
            m.__class__ = nn.BatchNorm2d
            del m.process_group
