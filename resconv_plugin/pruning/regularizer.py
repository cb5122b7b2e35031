"""L1 on the gates: the proximal soft-threshold (exact zeros) or torch-pruning's sub-gradient
(:class:`L1Regularizer`), applied step by step (:class:`L1Step`) by hooks that act after ``optimizer.step()``:
:class:`OptimizerHook` on a given optimizer, :class:`GateOptimizerHook` on whichever optimizer steps the gates (so
``regularize()`` needs no ``attach``, as in torch-pruning)."""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["L1Regularizer", "L1Step", "OptimizerHook", "GateOptimizerHook", "MODES"]

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


class GateOptimizerHook(OptimizerHook):
    """An :class:`OptimizerHook` on whichever optimizer steps the gates, found when it steps.

    A global post-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) watches every optimizer;
    while armed, the first ``step()`` of an optimizer that holds one of ``params()`` runs the callback with that
    optimizer as :attr:`optimizer` (for its learning rates and its state). Optimizers that hold no gate (e.g. of
    another model) are ignored. The hook is removed when it is garbage collected or :meth:`remove` d.

    Args:
        callback: the per-step work.
        params: returns the parameters to look for (the gates now: they change as layers are removed).

    Example:
        >>> gate = nn.Parameter(torch.tensor(0.5))
        >>> opt, seen = torch.optim.SGD([gate], lr=0.1), []
        >>> hook = GateOptimizerHook(lambda: seen.append(hook.lr_of(gate)), lambda: [gate])
        >>> hook.arm(); opt.step(); hook.remove()
        >>> seen
        [0.1]
    """

    def __init__(self, callback: Callable[[], None], params: Callable[[], List[nn.Parameter]]) -> None:
        self.optimizer, self._callback, self._armed, self._params = None, callback, False, params
        this = weakref.ref(self)  # the global hook must not keep the pruner alive

        def post_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            hook = this()
            if hook is not None and hook._armed and hook._holds_gates(optimizer):
                hook.optimizer = optimizer
                hook._fire()

        self._handle = register_optimizer_step_post_hook(post_step)
        weakref.finalize(self, self._handle.remove)

    def _holds_gates(self, optimizer: torch.optim.Optimizer) -> bool:
        gates = {id(p) for p in self._params()}
        return any(id(p) in gates for group in optimizer.param_groups for p in group["params"])


class L1Step:
    """A pruner's L1 on its gates, step by step, wherever the optimizer is.

    :meth:`regularize` (after ``loss.backward()``) adds the sub-gradient in sub-gradient mode, and, when work must
    follow the optimizer's step, arms a hook: after the next ``optimizer.step()`` of the :meth:`attach` ed optimizer,
    else of whichever optimizer holds the gates (:class:`GateOptimizerHook`), it applies the proximal step at that
    optimizer's learning rate, calls ``after()`` (the pruner's budget cap), and clears the optimizer state (momentum,
    Adam moments) of every gate at exactly 0, so that it stays there.

    Args:
        regularizer: the L1 (mode and strength).
        gammas: returns the gate parameters now.
        after: more work after each such optimizer step.

    Example:
        >>> gate = nn.Parameter(torch.tensor(0.5))
        >>> opt, l1 = torch.optim.SGD([gate], lr=1.0), L1Step(L1Regularizer("proximal", 0.1), lambda: [gate])
        >>> gate.grad = torch.tensor(0.0)
        >>> l1.regularize(after_optimizer=True); opt.step()  # no attach(): the optimizer that steps the gate
        True
        >>> round(gate.item(), 6)
        0.4
    """

    def __init__(self, regularizer: L1Regularizer, gammas: Callable[[], List[nn.Parameter]],
                 after: Callable[[], None] = lambda: None) -> None:
        self.regularizer, self._gammas, self._after = regularizer, gammas, after
        self.hook: Optional[OptimizerHook] = None
        self._pending_reg: Optional[float] = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Act after the steps of ``optimizer`` (instead of whichever optimizer holds the gates)."""
        self.detach()
        self.hook = OptimizerHook(optimizer, self._after_optimizer_step)

    def detach(self) -> None:
        """Stop acting after optimizer steps (until the next :meth:`regularize`)."""
        if self.hook is not None:
            self.hook.remove()
        self.hook = None

    def regularize(self, reg: Optional[float] = None, *, after_optimizer: bool) -> bool:
        """This step's L1: the sub-gradient now, and with ``after_optimizer`` the work after the optimizer's next
        step (armed; returns True). ``reg`` overrides the strength for this step."""
        self.regularizer.before_step(self._gammas(), reg)
        if not after_optimizer:
            return False
        if self.hook is None:  # no optimizer given: the next one that steps the gates
            self.hook = GateOptimizerHook(self._after_optimizer_step, self._gammas)
        self._pending_reg = self.regularizer.reg if reg is None else float(reg)
        self.hook.arm()
        return True

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        gammas = self._gammas()
        self.regularizer.after_step(gammas, self.hook.lr_of, self._pending_reg)
        self._after()
        for gamma in gammas:
            if gamma.item() == 0.0:
                self.hook.clear_state(gamma)
