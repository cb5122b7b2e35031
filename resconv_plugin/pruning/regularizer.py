"""L1 on the gates: the proximal soft-threshold (exact zeros) or torch-pruning's sub-gradient, and the hook that
applies per-step work after ``optimizer.step()``."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

__all__ = ["L1Regularizer", "OptimizerHook", "MODES"]

MODES = ("proximal", "subgradient")


class L1Regularizer:
    """``reg * |gamma|`` on every gate, as a proximal step or a sub-gradient.

    * ``"proximal"``: after each optimiser step, ``gamma <- clamp(gamma - lr * reg, 0, 1)`` with the learning rate of
      the gate's parameter group (the proximal operator of L1): gates reach exactly 0. The momentum / Adam state of a
      gate at 0 is cleared, so it stays at 0 unless the task gradient itself pulls it back.
    * ``"subgradient"``: ``grad += reg * sign(gamma)`` before the optimiser step, exactly like torch-pruning's
      ``BNScalePruner``. Gates hover near, not at, zero.

    Args:
        mode: ``"proximal"`` or ``"subgradient"``.
        reg: the strength (per unit learning rate in proximal mode).

    Example:
        >>> gate = nn.Parameter(torch.tensor(0.5))
        >>> L1Regularizer("proximal", 0.1).after_step([gate], lr_of=lambda p: 1.0)
        >>> round(gate.item(), 6)
        0.4
    """

    def __init__(self, mode: str = "proximal", reg: float = 1e-2) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg < 0:
            raise ValueError(f"reg must be a non-negative float, got {reg!r}")
        self.mode, self.reg = mode, float(reg)

    @torch.no_grad()
    def before_step(self, gammas: Iterable[nn.Parameter], reg: Optional[float] = None) -> None:
        """Sub-gradient mode: add ``reg * sign(gamma)`` to each gate's gradient (no-op in proximal mode)."""
        reg = self.reg if reg is None else reg
        if self.mode != "subgradient" or reg == 0:
            return
        for gamma in gammas:
            if gamma.grad is not None:
                gamma.grad.add_(reg * torch.sign(gamma))

    @torch.no_grad()
    def after_step(self, gammas: Iterable[nn.Parameter], lr_of: Callable[[nn.Parameter], float],
                   reg: Optional[float] = None) -> None:
        """Proximal mode: the soft-threshold ``clamp(gamma - lr * reg, 0, 1)`` (no-op in sub-gradient mode)."""
        reg = self.reg if reg is None else reg
        if self.mode != "proximal":
            return
        for gamma in gammas:
            gamma.sub_(lr_of(gamma) * reg).clamp_(0.0, 1.0)

    def penalty(self, gammas: Iterable[nn.Parameter], reg: Optional[float] = None) -> torch.Tensor:
        """The L1 term ``reg * sum(|gamma|)`` (to add to the loss yourself)."""
        reg = self.reg if reg is None else reg
        return reg * sum(g.abs() for g in gammas)


class OptimizerHook:
    """Runs a callback after each ``optimizer.step()`` that follows an :meth:`arm` call (once per arm).

    It also knows each parameter's learning rate and clears the optimiser state of a parameter (momentum, Adam
    moments), which is how a gate at exactly 0 stays at 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, callback: Callable[[], None]) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer, self._callback, self._armed = optimizer, callback, False
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._fire())

    def arm(self) -> None:
        self._armed = True

    def _fire(self) -> None:
        if self._armed:
            self._armed = False
            self._callback()

    def remove(self) -> None:
        self._handle.remove()

    def lr_of(self, param: nn.Parameter) -> float:
        for group in self.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
        raise ValueError("a gate parameter is not in the attached optimizer: build the optimizer from "
                         "model.parameters() after resconv_plugin.convert()")

    @torch.no_grad()
    def clear_state(self, param: nn.Parameter) -> None:
        for key, value in (self.optimizer.state.get(param) or {}).items():
            if isinstance(value, torch.Tensor) and key != "step":
                value.zero_()
