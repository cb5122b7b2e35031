"""Knowledge distillation from the unpruned model: keeps the pruned network close to the one it came from.

Used in sparsity training and fine-tuning (``resconv compress --distill``, on by default: benchmarks/results/
ablation_depth.md). The loss is Hinton et al.'s: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
mixed with the task loss as ``(1 - alpha) * task + alpha * distillation``.

Example:
    >>> import torch
    >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    >>> distillation_loss(s, t).item()
    0.0
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from resconv_plugin._checks import POSITIVE, check_fraction, check_number
from resconv_plugin._utils import check_module

__all__ = ["distillation_loss", "DistillationLoss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Args:
        student_logits, teacher_logits: ``[batch, classes]``.
        temperature: ``T`` > 0 (softens both distributions; ``T^2`` keeps the gradient scale independent of it).
    """
    check_number("temperature", temperature, POSITIVE)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits.detach() / t, 1),
                    log_target=True, reduction="batchmean") * t * t


class DistillationLoss(nn.Module):
    """``(1 - alpha) * criterion(student, target) + alpha * distillation_loss(student, teacher(inputs), T)``.

    The teacher runs in eval mode without gradients.

    Args:
        teacher: the unpruned model.
        alpha: weight of the distillation term in [0, 1].
        temperature: the distillation temperature.
        criterion: the task loss (default cross-entropy).

    Example:
        >>> teacher = torch.nn.Linear(4, 3)
        >>> loss_fn = DistillationLoss(teacher, alpha=0.5)
        >>> x = torch.randn(2, 4)
        >>> loss = loss_fn(teacher(x), torch.tensor([0, 1]), x)
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0,
                 criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        check_module(teacher, "teacher")
        check_fraction("alpha", alpha)
        distillation_loss(torch.zeros(1, 1), torch.zeros(1, 1), temperature)  # validates the temperature
        self.teacher = teacher.eval()
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.criterion = criterion or nn.CrossEntropyLoss()

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(student_logits, target)
        if self.alpha == 0.0:
            return loss
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(inputs)
        return (1 - self.alpha) * loss + self.alpha * distillation_loss(student_logits, teacher_logits,
                                                                        self.temperature)
