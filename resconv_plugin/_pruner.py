"""``LayerPruner``: L1 sparsity on the depth gates and budgeted layer / block removal, in torch-pruning's protocol."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin._block import ResConv
from resconv_plugin._flops import count_flops
from resconv_plugin._fuse import fuse
from resconv_plugin._graph import trace
from resconv_plugin._latency import median_latency, module_latencies
from resconv_plugin._surgery import Removal, gated_modules, plan_removal, remove
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode, run_example

__all__ = ["LayerPruner", "StepReport", "MODES"]

MODES = ("proximal", "subgradient")
IgnoredLayers = Iterable[Union[str, nn.Module, type]]


@dataclass
class StepReport:
    """What one :meth:`LayerPruner.step` did.

    Attributes:
        removed: the removals, in order.
        max_abs_change: max |output after - output before| on the calibration inputs (0.0 when every removed
            gate was exactly 0 and the removal was exact).
        relative_change: ``max_abs_change`` over max |output before|.
        recalibrated: whether BatchNorm statistics were re-estimated on the calibration inputs.
        change_after_recalibration: the same measure after re-estimation (None when not recalibrated).
    """

    removed: List[Removal] = field(default_factory=list)
    max_abs_change: float = 0.0
    relative_change: float = 0.0
    recalibrated: bool = False
    change_after_recalibration: Optional[float] = None

    def __str__(self) -> str:
        exact = sum(r.gamma == 0.0 for r in self.removed)
        text = (f"removed {len(self.removed)} ({exact} at gamma = 0): output change max |dy| = "
                f"{self.max_abs_change:.3g} ({100 * self.relative_change:.3g}% of max |y|)")
        if self.recalibrated:
            text += f"; after BatchNorm re-estimation {self.change_after_recalibration:.3g}"
        return text


def _check_fraction(name: str, value: Optional[float], upper_inclusive: bool = False) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if upper_inclusive else ')'}, got {value!r}")
    return float(value)


class LayerPruner:
    """Depth pruner for models converted with :func:`resconv_plugin.convert`, in torch-pruning's pruner protocol.

    During sparsity training, call ``regularize(model)`` after ``loss.backward()`` (as with torch-pruning's
    ``BNScalePruner``); then ``step()`` removes the selected layers (ResConv) and blocks (BlockGate) and returns their
    names. Both kinds of gates are handled alike: ``gamma`` in [0, 1], 1 = the layer as it was, 0 = the identity.

    **Regularisation modes.**

    * ``mode="proximal"`` (default): after each optimiser step, ``gamma <- clamp(gamma - lr * reg, 0, 1)`` with the
      learning rate of the gate's parameter group (a soft-threshold, i.e. the proximal operator of L1). Gates reach
      exactly 0, so removing them changes nothing and needs no retraining. Needs the optimizer
      (``optimizer=...`` or :meth:`attach`); the momentum / Adam state of a gate at 0 is cleared, so it stays at 0
      unless the task gradient itself pulls it back.
    * ``mode="subgradient"``: ``grad += reg * sign(gamma)`` in ``regularize()``, exactly like ``BNScalePruner``.
      Gates hover near, not at, zero (and may leave [0, 1]: nothing clamps them), so removal changes the output;
      with SGD momentum the push is about ``1 / (1 - momentum)`` times stronger than the proximal step at the same
      ``reg``. :meth:`penalty` gives the same L1 term for adding to the loss yourself.

    **Selection** (exactly one; default ``threshold=0.0``, i.e. exactly-zero gates): ``threshold`` on gamma;
    ``pruning_ratio`` = fraction of the (not ignored) gates; ``flops_reduction`` = fraction of the fused model's
    FLOPs (fvcore, ``count_flops``) to remove; ``latency_reduction`` = fraction of the fused model's latency on this
    machine. Gates are taken in order of smallest gamma; ties go to the layer that saves more (FLOPs or latency,
    else FLOPs), then module order. FLOPs and latency weigh in only through the budget: the ranking is by gamma.
    Per-layer savings: the fused conv (or the whole fused block) plus the activation that removal also drops;
    per-layer latency is the median time of that fused layer run alone on its input, as a share of the median time of
    the whole fused model.

    **Budget-driven sparsity.** With a budget (``pruning_ratio``, ``flops_reduction`` or ``latency_reduction``) and
    ``sparsity_steps`` (the number of ``regularize()`` calls you will make), every step re-ranks the gates, takes the
    set that meets the budget, and caps those gates: the cap stays 1 for the first ``cap_start`` of sparsity
    training (default 0), then falls linearly to exactly 0 at ``zero_at``; the rest of the training lets the network
    adapt. The L1 term (``reg``) on all gates provides the ranking. You give a budget, not a hand-tuned ``reg``.
    (Fashion-MNIST ResNet-20, 40% FLOPs, 3 sparsity epochs, one seed: after sparsity training the defaults kept
    89.34%, ``cap_start=0.25`` 87.99%, ``reg=0.3`` 85.84%; after 2 fine-tuning epochs the defaults reached 90.78%
    and ``cap_start=0.25`` 91.31%: benchmarks/results/depth_prune_fmnist.md.)

    Args:
        model: a model holding ResConv layers and/or BlockGates.
        example_inputs: inputs for FLOP counting, latency and the output-change measurement.
        reg: L1 strength on every gate (per unit learning rate in proximal mode).
        mode: ``"proximal"`` or ``"subgradient"``.
        threshold, pruning_ratio, flops_reduction, latency_reduction: the selection (one at most).
        ignored_layers: gates never removed nor regularised: names, modules (the ResConv, its conv, the block) or
            module classes.
        optimizer: the optimizer that updates the gates (proximal mode).
        sparsity_steps: planned number of ``regularize()`` calls, for budget-driven sparsity.
        zero_at: fraction of ``sparsity_steps`` by which the budgeted gates reach 0.
        cap_start: fraction of ``sparsity_steps`` of L1 alone before the budget cap starts to fall.
        calibration_inputs: batch on which ``step()`` measures the output change (default: ``example_inputs``).
        latency_repeats: timing repeats per measurement for ``latency_reduction``.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> x = torch.randn(8, 1, 28, 28)
        >>> _ = resconv_plugin.convert(model, x)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> pruner = resconv_plugin.LayerPruner(model, x, flops_reduction=0.3, optimizer=opt, sparsity_steps=100)
        >>> for _ in range(100):  # your training loop
        ...     loss = model(x).logsumexp(1).mean()
        ...     opt.zero_grad(); loss.backward()
        ...     pruner.regularize(model)
        ...     opt.step()
        >>> removed = pruner.step()  # the layers meeting the budget, all at gamma == 0
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: ExampleInputs,
        *,
        reg: float = 1e-2,
        mode: str = "proximal",
        threshold: Optional[float] = None,
        pruning_ratio: Optional[float] = None,
        flops_reduction: Optional[float] = None,
        latency_reduction: Optional[float] = None,
        ignored_layers: Optional[IgnoredLayers] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        sparsity_steps: Optional[int] = None,
        zero_at: float = 0.75,
        cap_start: float = 0.0,
        calibration_inputs: Optional[ExampleInputs] = None,
        latency_repeats: int = 20,
    ) -> None:
        self.model = check_module(model)
        self.example_inputs = as_input_tuple(example_inputs)
        self.calibration_inputs = as_input_tuple(calibration_inputs) if calibration_inputs is not None else None
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg < 0:
            raise ValueError(f"reg must be a non-negative float, got {reg!r}")
        self.mode, self.reg = mode, float(reg)
        given = {k: v for k, v in dict(threshold=threshold, pruning_ratio=pruning_ratio,
                                       flops_reduction=flops_reduction, latency_reduction=latency_reduction).items()
                 if v is not None}
        if len(given) > 1:
            raise ValueError(f"give exactly one selection mode (threshold, pruning_ratio, flops_reduction or "
                             f"latency_reduction), got {len(given)}: {', '.join(given)}")
        self.threshold = _check_fraction("threshold", threshold, upper_inclusive=True)
        self.pruning_ratio = _check_fraction("pruning_ratio", pruning_ratio)
        self.flops_reduction = _check_fraction("flops_reduction", flops_reduction)
        self.latency_reduction = _check_fraction("latency_reduction", latency_reduction)
        if not given:
            self.threshold = 0.0
        if sparsity_steps is not None and (isinstance(sparsity_steps, bool) or not isinstance(sparsity_steps, int)
                                           or sparsity_steps < 1):
            raise ValueError(f"sparsity_steps must be a positive int, got {sparsity_steps!r}")
        if not 0.0 < zero_at <= 1.0:
            raise ValueError(f"zero_at must be in (0, 1], got {zero_at!r}")
        if not 0.0 <= cap_start < zero_at:
            raise ValueError(f"cap_start must be in [0, zero_at={zero_at}), got {cap_start!r}")
        self.cap_start = cap_start
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise ValueError(f"latency_repeats must be a positive int, got {latency_repeats!r}")
        self.sparsity_steps, self.zero_at, self.latency_repeats = sparsity_steps, zero_at, latency_repeats
        self.ignored_layers = list(ignored_layers or [])
        for item in self.ignored_layers:
            if not isinstance(item, (str, nn.Module, type)):
                raise TypeError(f"ignored_layers entries must be names, modules or module classes, got "
                                f"{type(item).__name__}")
        self.steps_done = 0
        self.last_step: Optional[StepReport] = None
        self._history: List[Removal] = []
        self._pending_reg: Optional[float] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._hook = None
        self.update_regularizer()
        if self._budget_kind() in ("flops", "latency"):
            self.select()  # fail early on an unreachable target
        if optimizer is not None:
            self.attach(optimizer)

    # ----------------------------------------------------------------------------------------------- gates
    def update_regularizer(self) -> None:
        """Re-collect the gates after the model's structure changed (called by :meth:`step` itself)."""
        graph = trace(self.model)
        all_gates = gated_modules(self.model, graph)
        if not all_gates:
            raise ValueError(f"{type(self.model).__name__} has no ResConv layer or gated block: call "
                             "resconv_plugin.convert(model, example_inputs) (level='layer' or 'block') first")
        self._gates = {n: g for n, g in all_gates.items() if not self._is_ignored(n, g)}
        self._order = {n: i for i, n in enumerate(all_gates)}
        self._costs: Dict[str, Tuple[Dict[str, float], float]] = {}

    def _is_ignored(self, name: str, gate: nn.Module) -> bool:
        owner = self.model.get_submodule(name)  # the ResConv, or the block
        related = [owner, gate] + ([owner.conv] if isinstance(owner, ResConv) else [])
        for item in self.ignored_layers:
            if isinstance(item, str) and item == name:
                return True
            if isinstance(item, type) and any(isinstance(m, item) for m in related):
                return True
            if isinstance(item, nn.Module) and any(m is item for m in related):
                return True
        return False

    @property
    def gates(self) -> Dict[str, float]:
        """``{name: gamma}`` of the gates this pruner regularises and may remove."""
        return {n: g.gamma.item() for n, g in self._gates.items()}

    def penalty(self, reg: Optional[float] = None) -> torch.Tensor:
        """The L1 term ``reg * sum(|gamma|)``, to add to the loss instead of calling :meth:`regularize`."""
        reg = self.reg if reg is None else reg
        return reg * sum(g.gamma.abs() for g in self._gates.values())

    # ------------------------------------------------------------------------------------- regularisation
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the proximal step after each ``optimizer.step()`` that follows a ``regularize()`` call."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._hook is not None:
            self._hook.remove()
        self._optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_optimizer_step())

    def detach(self) -> None:
        """Stop applying the proximal step after the attached optimizer's steps (e.g. once sparsity training ends)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._optimizer = None, None

    def regularize(self, model: Optional[nn.Module] = None, reg: Optional[float] = None) -> None:
        """Apply the L1 pressure for this training step; call after ``loss.backward()``, before ``optimizer.step()``.

        Args:
            model: accepted for torch-pruning compatibility (the pruner acts on the model it was built with; a
                DistributedDataParallel wrapper of it is fine).
            reg: overrides the strength for this step.
        """
        if model is not None:
            check_module(model)
        reg = self.reg if reg is None else float(reg)
        if self.mode == "subgradient":
            with torch.no_grad():
                for gate in self._gates.values():
                    if gate.gamma.grad is not None:
                        gate.gamma.grad.add_(reg * torch.sign(gate.gamma))
                self._apply_budget_cap()
            self.steps_done += 1
            return
        if self._optimizer is None:
            raise ValueError("mode='proximal' applies its step after optimizer.step(): pass optimizer=... to "
                             "LayerPruner or call pruner.attach(optimizer) once")
        self._pending_reg = reg

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        if self._pending_reg is None:
            return
        reg, self._pending_reg = self._pending_reg, None
        for gate in self._gates.values():
            gamma = gate.gamma
            gamma.sub_(self._lr_of(gamma) * reg).clamp_(0.0, 1.0)
        self._apply_budget_cap()
        self.steps_done += 1
        for gate in self._gates.values():
            if gate.gamma.item() == 0.0:
                self._clear_optimizer_state(gate.gamma)

    def _lr_of(self, param: nn.Parameter) -> float:
        for group in self._optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return float(group["lr"])
        raise ValueError("a gate parameter is not in the attached optimizer: build the optimizer from "
                         "model.parameters() after resconv_plugin.convert()")

    def _clear_optimizer_state(self, param: nn.Parameter) -> None:
        state = self._optimizer.state.get(param)
        for key, value in (state or {}).items():
            if isinstance(value, torch.Tensor) and key != "step":
                value.zero_()

    def _apply_budget_cap(self) -> None:
        if self.sparsity_steps is None or self._budget_kind() is None:
            return
        progress = self.steps_done / self.sparsity_steps
        if progress < self.cap_start:
            return  # L1 alone first: the ranking comes from training, not from the initial ties
        cap = max(0.0, 1.0 - (progress - self.cap_start) / (self.zero_at - self.cap_start))
        for name in self.select():
            self._gates[name].gamma.clamp_(max=cap)

    # ------------------------------------------------------------------------------------------ selection
    def _budget_kind(self) -> Optional[str]:
        if self.flops_reduction is not None:
            return "flops"
        if self.latency_reduction is not None:
            return "latency"
        return "ratio" if self.pruning_ratio is not None else None

    def savings(self, kind: str = "flops") -> Tuple[Dict[str, float], float]:
        """``({name: what removing it saves}, total)`` in FLOPs or seconds of the fused model (cached)."""
        if kind not in ("flops", "latency"):
            raise ValueError(f"kind must be 'flops' or 'latency', got {kind!r}")
        if kind not in self._costs:
            self._costs[kind] = self._measure_savings(kind)
        return self._costs[kind]

    def _measure_savings(self, kind: str) -> Tuple[Dict[str, float], float]:
        graph = trace(self.model)
        plans = {name: plan_removal(self.model, name, graph) for name in self._gates}
        with torch.no_grad():
            fused = fuse(copy.deepcopy(self.model).eval(), inplace=True)
        if kind == "flops":
            report = count_flops(fused, self.example_inputs)
            by = report.by_module
            saved = {}
            for name, plan in plans.items():
                n = by.get(name, 0)
                if plan.removed_activation:
                    n += by.get(plan.removed_activation, 0)
                if plan.kept_activation:
                    n -= by.get(plan.kept_activation, 0)
                saved[name] = float(n)
            return saved, float(report.total)
        groups = {name: [name] + ([plan.removed_activation] if plan.removed_activation else [])
                  for name, plan in plans.items()}
        with eval_mode(fused):
            saved = module_latencies(fused, self.example_inputs, groups, repeats=self.latency_repeats)
            total = median_latency(lambda: fused(*self.example_inputs), repeats=self.latency_repeats)
        return saved, total

    def select(self) -> List[str]:
        """Names of the gates the next :meth:`step` removes, in removal order.

        Raises:
            ValueError: a FLOPs or latency target that removing every gate could not reach (the message names the
                largest reachable reduction).
        """
        kind = self._budget_kind()
        saved = self.savings("latency" if kind == "latency" else "flops")[0]  # cached; also breaks ties
        order = sorted(self._gates, key=lambda n: (abs(self._gates[n].gamma.item()), -saved.get(n, 0.0),
                                                   self._order[n]))
        if kind is None:
            return [n for n in order if abs(self._gates[n].gamma.item()) <= self.threshold]
        if kind == "ratio":
            return order[:math.floor(self.pruning_ratio * len(order) + 1e-9)]
        saved, total = self.savings(kind)
        target = (self.flops_reduction if kind == "flops" else self.latency_reduction) * total
        reachable = sum(saved[n] for n in order if not any(n.startswith(f"{b}.") for b in order))
        if reachable < target:
            what = "flops_reduction" if kind == "flops" else "latency_reduction"
            raise ValueError(f"{what}={target / total:.3g} is unreachable: removing every prunable gate "
                             f"({len(order)}) removes at most {reachable / total:.3f} of the model's "
                             f"{'FLOPs' if kind == 'flops' else 'latency'}")
        chosen, acc = [], 0.0
        for name in order:
            if acc >= target:
                break
            if any(name.startswith(f"{c}.") for c in chosen):
                continue  # inside a block already chosen: its saving is part of the block's
            inner = [c for c in chosen if c.startswith(f"{name}.")]
            for c in inner:  # a block chosen after layers inside it: count the block once
                chosen.remove(c)
                acc -= saved[c]
            chosen.append(name)
            acc += saved[name]
        return chosen

    # ------------------------------------------------------------------------------------------- removal
    @torch.no_grad()
    def step(self, *, calibration_inputs: Optional[ExampleInputs] = None, recalibrate_bn: bool = False) -> List[str]:
        """Remove the selected layers / blocks from the model (in place) and return the names removed.

        A selected layer inside a selected block goes with the block and is not listed separately.

        The output change is measured on the calibration inputs (``calibration_inputs``, else the pruner's, else
        ``example_inputs``) in eval mode and kept in :attr:`last_step`: exactly 0 when every removed gate was 0.

        Args:
            calibration_inputs: a batch for the output-change measurement (and BatchNorm re-estimation).
            recalibrate_bn: after removing gates that were not 0, re-estimate every BatchNorm's running statistics
                on the calibration batch (cumulative average over one forward pass in training mode).
        """
        calib = as_input_tuple(calibration_inputs) if calibration_inputs is not None else (
            self.calibration_inputs or self.example_inputs)
        names = self.select()
        with eval_mode(self.model):
            before = run_example(self.model, calib)
            removed = remove(self.model, names)
            after = self.model(*calib)
        scale = before.abs().max().item() or 1.0
        report = StepReport(removed=removed, max_abs_change=(after - before).abs().max().item())
        report.relative_change = report.max_abs_change / scale
        if recalibrate_bn and any(r.gamma != 0.0 for r in removed):
            recalibrate_batchnorm(self.model, calib)
            with eval_mode(self.model):
                report.change_after_recalibration = (self.model(*calib) - before).abs().max().item()
            report.recalibrated = True
        self.last_step = report
        self._history.extend(removed)
        if gated_modules(self.model):
            self.update_regularizer()
        else:
            self._gates = {}
        return [r.name for r in removed]

    def pruning_history(self) -> List[dict]:
        """Every removal so far, as JSON-able dicts (name, kind, gamma, replaced_by, removed/kept activation)."""
        return [r.to_dict() for r in self._history]

    def load_pruning_history(self, history: Sequence[dict]) -> None:
        """Redo the removals of ``history`` (from :meth:`pruning_history`) on this pruner's model."""
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, dict) and "name" in h for h in history):
            raise TypeError("history must be a list of dicts with a 'name', as returned by pruning_history()")
        missing = [h["name"] for h in history if h["name"] not in self._gates]
        if missing:
            raise ValueError(f"pruning history names gates this model does not have: {missing[:5]}")
        self._history.extend(remove(self.model, [h["name"] for h in history]))
        self.update_regularizer()


@torch.no_grad()
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
