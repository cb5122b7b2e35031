"""``LayerPruner``: depth pruning in torch-pruning's pruner protocol, composed of an importance criterion, a cost
table, a selection rule, the budget cap schedule and the L1 regulariser."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from resconv_plugin.nn.resconv import ResConv
from resconv_plugin.fx.graph import trace
from resconv_plugin.fx.surgery import Removal, gated_modules, remove
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode, run_example
from resconv_plugin.pruning.calibration import recalibrate_batchnorm
from resconv_plugin.pruning.cost import flops_savings, latency_table, measured_saving
from resconv_plugin.pruning.importance import GateImportance, MagnitudeImportance, make_importance
from resconv_plugin.pruning.regularizer import MODES, L1Regularizer, OptimizerHook
from resconv_plugin.pruning.schedule import CapSchedule
from resconv_plugin.pruning.select import (
    METHODS, _short, select_count, select_iteratively, select_within_budget, set_saving,
)

__all__ = ["LayerPruner", "StepReport", "MODES", "BUDGETS", "given_budget"]

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


def _inside(name: str, block: str) -> bool:
    return name.startswith(f"{block}.")


_FIT_ROUNDS = 6  # measured corrections of a latency budget's goal (LayerPruner._fit_latency_goal)
#: Accepted overshoot of a latency budget, as a fraction of the latency; a first timing short of the budget by no
#: more than this is timed again (LayerPruner._fit_latency_goal).
_FIT_TOLERANCE = 0.02

#: The ways to say what to remove; a pruner takes at most one (none: ``threshold=0.0``).
BUDGETS = ("threshold", "pruning_ratio", "flops_reduction", "latency_reduction")


def given_budget(**budgets: Optional[float]) -> Optional[Tuple[str, float]]:
    """The one budget among ``budgets`` (keyword: value, None = not given) that is given, as ``(name, value)``;
    None when none is. The single check of the one-budget rule (:class:`LayerPruner`, the ``resconv`` command).

    Raises:
        ValueError: a name outside :data:`BUDGETS`, or more than one budget given.

    Example:
        >>> given_budget(flops_reduction=0.5, threshold=None)
        ('flops_reduction', 0.5)
    """
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget {', '.join(unknown)}: the budgets are {', '.join(BUDGETS)}")
    given = [(k, v) for k, v in budgets.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give exactly one selection mode (threshold, pruning_ratio, flops_reduction or "
                         f"latency_reduction), got {len(given)}: {', '.join(k for k, _ in given)}")
    return given[0] if given else None


class LayerPruner:
    """Depth pruner for models converted with :func:`resconv_plugin.convert`, in torch-pruning's pruner protocol.

    During sparsity training, call ``regularize(model)`` after ``loss.backward()`` (as with torch-pruning's
    ``BNScalePruner``); then ``step()`` removes the selected layers (ResConv) and blocks (BlockGate) and returns their
    names. Both kinds of gates are handled alike: ``gamma`` in [0, 1], 1 = the layer as it was, 0 = the identity.

    The pruner composes small parts, each in its own module of :mod:`resconv_plugin.pruning`: an **importance**
    criterion (gates -> scores), a **cost** table (what each removal saves), a **selection** rule (which gates meet
    the budget at least importance), the **cap schedule** and the **L1 regulariser**.

    **Selection** (exactly one; default ``threshold=0.0``, i.e. exactly-zero gates): ``threshold`` on ``|gamma|``;
    ``pruning_ratio`` = fraction of the (not ignored) gates, lowest importance first; ``flops_reduction`` = fraction of
    the deployed model's FLOPs (fvcore, gates fused and BatchNorms folded); ``latency_reduction`` = fraction of the
    deployed model's latency, from a lookup table measured on this machine at the example input's batch size
    (:func:`~resconv_plugin.pruning.latency_table`), the chosen set then timed as a whole and the table's goal
    corrected until the measured saving meets the budget (:attr:`latency_fit`). Budgets are met at the least total
    importance: exactly by dynamic programming over the savings (``selection="dp"``, default), or greedily by importance
    per unit saved (``"greedy"``; always with nested gates). An iterative criterion (``importance="removal-iterative"``)
    is re-measured after each chosen gate and selected greedily. Ties go to the gate that saves more, then module order.

    **Importance** (``importance=``): ``"magnitude"`` (``|gamma|``, the paper's criterion), ``"removal"`` (the measured
    loss increase when the gate is set to 0 on ``calibration_inputs``: cross-entropy with ``calibration_targets``,
    else the KL divergence from the unpruned outputs), ``"removal-iterative"`` (the same, re-measured after each
    choice), ``"taylor"`` (``|gamma * dL/dgamma|`` averaged over the sparsity-training steps), or any
    :class:`~resconv_plugin.pruning.GateImportance`.

    **Budget-driven sparsity.** With a budget (``pruning_ratio``, ``flops_reduction`` or ``latency_reduction``) and
    ``sparsity_steps`` (the number of ``regularize()`` calls you will make), the selected set is capped: the cap stays
    1 for the first ``cap_start`` of sparsity training (default 0), then falls linearly to exactly 0 at ``zero_at``,
    and the rest of the training lets the network adapt. The set is chosen when the cap starts (with
    ``cap_start=0``: when the pruner is built, from the model as given) and re-ranked every
    ``reselect_every`` steps until the cap reaches 0 (default: every step for ``"magnitude"``, whose ranking only
    training can separate, as before; once for the other criteria, which rank before training); with
    ``hysteresis`` h, a gate outside the set must score (1 - h) times less per saving than one inside to replace it.
    ``reg`` (L1 on every gate) defaults to 1e-2 for magnitude (it provides that ranking) and for threshold
    selection, and to 0 when another criterion ranks the gates (the L1 would only shrink layers that stay).

    **Regularisation modes.** ``mode="proximal"`` (default): after each optimiser step, ``gamma <- clamp(gamma - lr
    * reg, 0, 1)`` (exact zeros). ``mode="subgradient"``: ``grad += reg * sign(gamma)`` as ``BNScalePruner``. The
    budget cap (the selected gates clamped to [0, cap]) is applied after the optimiser step in both modes, so it
    needs the optimizer (``optimizer=`` or :meth:`attach`).

    Args:
        model: a model holding ResConv layers and/or BlockGates.
        example_inputs: inputs for FLOP counting and latency (the deployment input: batch 1 by default).
        importance: the criterion: ``"magnitude"``, ``"removal"``, ``"removal-iterative"``, ``"taylor"`` or an
            instance of :class:`~resconv_plugin.pruning.GateImportance`.
        reg: L1 strength on every gate (per unit learning rate in proximal mode); default as above.
        mode: ``"proximal"`` or ``"subgradient"``.
        threshold, pruning_ratio, flops_reduction, latency_reduction: the selection (one at most).
        ignored_layers: gates never removed nor regularised: names, modules or module classes; each covers the
            module and everything inside it (as in torch-pruning).
        optimizer: the optimizer that updates the gates.
        sparsity_steps: planned number of ``regularize()`` calls, for budget-driven sparsity.
        zero_at: fraction of ``sparsity_steps`` by which the budgeted gates reach 0.
        cap_start: fraction of ``sparsity_steps`` before the budget cap starts to fall.
        calibration_inputs: a batch of real inputs for data-driven importance and for the output-change
            measurement of ``step()`` (default: ``example_inputs``).
        calibration_targets: class labels of ``calibration_inputs`` (loss-based importance).
        selection: ``"dp"`` or ``"greedy"``.
        reselect_every: steps between re-rankings during budget-driven sparsity (None: the criterion's default).
        hysteresis: advantage kept by the current set at a re-ranking, in [0, 1).
        latency_repeats: timing rounds of the latency table.
        latency_channels_last: time the latency table in channels-last memory format.
        latency_device: the device the latency table is measured on (the one you deploy to; default: the example
            inputs' device).
        state: a :meth:`state_dict` of a pruner built with the same model and settings (e.g. rank 0's in a
            distributed run), restored as the pruner is built: its cost tables and latency fit are used instead of
            measuring again, so every process follows one clock and none can disagree about the budget. A state
            without a selection (e.g. of a pruner that only checked the budget) keeps the one made as this pruner
            is built.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> _ = resconv_plugin.convert(model, x)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> pruner = resconv_plugin.LayerPruner(model, x[:1], importance="removal", flops_reduction=0.3,
        ...                                     calibration_inputs=x, optimizer=opt, sparsity_steps=100)
        >>> for _ in range(100):  # your training loop
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
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
        importance: Union[str, GateImportance] = "magnitude",
        reg: Optional[float] = None,
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
        calibration_targets: Optional[torch.Tensor] = None,
        selection: str = "dp",
        reselect_every: Optional[int] = None,
        hysteresis: float = 0.0,
        latency_repeats: int = 20,
        latency_channels_last: bool = False,
        latency_device: Union[str, torch.device, None] = None,
        state: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.model = check_module(model)
        self.example_inputs = as_input_tuple(example_inputs)
        self.calibration_inputs = as_input_tuple(calibration_inputs) if calibration_inputs is not None else None
        if calibration_targets is not None and not isinstance(calibration_targets, torch.Tensor):
            raise TypeError(f"calibration_targets must be a tensor of class indices, got "
                            f"{type(calibration_targets).__name__}")
        if calibration_targets is not None and calibration_inputs is None:
            raise ValueError("calibration_targets are the labels of calibration_inputs: pass both")
        self.calibration_targets = calibration_targets
        self.importance = make_importance(importance)
        given = given_budget(threshold=threshold, pruning_ratio=pruning_ratio, flops_reduction=flops_reduction,
                             latency_reduction=latency_reduction)
        self.threshold = _check_fraction("threshold", threshold, upper_inclusive=True)
        self.pruning_ratio = _check_fraction("pruning_ratio", pruning_ratio)
        self.flops_reduction = _check_fraction("flops_reduction", flops_reduction)
        self.latency_reduction = _check_fraction("latency_reduction", latency_reduction)
        if not given:
            self.threshold = 0.0
        magnitude = isinstance(self.importance, MagnitudeImportance)
        if reg is None:
            reg = 1e-2 if magnitude or self._budget_kind() is None else 0.0
        self.regularizer = L1Regularizer(mode, reg)
        if sparsity_steps is not None and (isinstance(sparsity_steps, bool) or not isinstance(sparsity_steps, int)
                                           or sparsity_steps < 1):
            raise ValueError(f"sparsity_steps must be a positive int, got {sparsity_steps!r}")
        self.schedule = CapSchedule(sparsity_steps or 1, zero_at, cap_start)
        self.sparsity_steps = sparsity_steps
        if selection not in METHODS:
            raise ValueError(f"selection must be one of {METHODS}, got {selection!r}")
        self.selection = selection
        if reselect_every is not None and (isinstance(reselect_every, bool) or not isinstance(reselect_every, int)
                                           or reselect_every < 1):
            raise ValueError(f"reselect_every must be a positive int or None, got {reselect_every!r}")
        self.reselect_every = reselect_every if reselect_every is not None else (1 if magnitude else None)
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, (int, float)) or not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        self.hysteresis = float(hysteresis)
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise ValueError(f"latency_repeats must be a positive int, got {latency_repeats!r}")
        self.latency_repeats, self.latency_channels_last = latency_repeats, bool(latency_channels_last)
        self.latency_device = torch.device(latency_device) if latency_device is not None else None
        self.ignored_layers = list(ignored_layers or [])
        for item in self.ignored_layers:
            if not isinstance(item, (str, nn.Module, type)):
                raise TypeError(f"ignored_layers entries must be names, modules or module classes, got "
                                f"{type(item).__name__}")
        self.steps_done = 0
        self.last_step: Optional[StepReport] = None
        self.reselections: List[Dict[str, Any]] = []
        self._history: List[Removal] = []
        self._selected: Optional[List[str]] = None
        self._selected_at: Optional[int] = None
        self._hook: Optional[OptimizerHook] = None
        self._pending_reg: Optional[float] = None
        self.update_regularizer()
        if not self._gates:
            raise ValueError(f"ignored_layers cover all {len(self._order)} gates of {type(model).__name__}: nothing "
                             "is left to prune")
        if state is not None:
            self._check_state(state)
            self._take_measurements(state)  # nothing below times again
        if self._budget_kind() in ("flops", "latency"):
            self._check_reachable()  # fail early on an unreachable target
        if self._budget_driven() and self.schedule.started(0):
            self._reselect()  # chosen from the model as given, before training moves it
        if state is not None:
            chosen, fit = (self._selected, self._selected_at), self.latency_fit
            self.load_state_dict(state)
            if self._selected is None:  # a state without a selection (e.g. a reachability check's tables only)
                (self._selected, self._selected_at), self.latency_fit = chosen, self.latency_fit or fit
        if optimizer is not None:
            self.attach(optimizer)

    # ----------------------------------------------------------------------------------------------- gates
    @property
    def reg(self) -> float:
        """The L1 strength."""
        return self.regularizer.reg

    @property
    def mode(self) -> str:
        return self.regularizer.mode

    def update_regularizer(self) -> None:
        """Re-collect the gates after the model's structure changed (called by :meth:`step` itself)."""
        all_gates = gated_modules(self.model, trace(self.model))
        if not all_gates:
            raise ValueError(f"{type(self.model).__name__} has no ResConv layer or gated block: call "
                             "resconv_plugin.convert(model, example_inputs) (level='layer' or 'block') first")
        self._gates = {n: g for n, g in all_gates.items() if not self._is_ignored(n, g)}
        self._order = list(all_gates)
        self._costs: Dict[str, tuple] = {}
        self.latency_fit: Optional[Dict[str, Any]] = None  # the measured correction of a latency budget (rank())

    def _is_ignored(self, name: str, gate: nn.Module) -> bool:
        owner = self.model.get_submodule(name)  # the ResConv, or the block
        related = [owner, gate] + ([owner.conv] if isinstance(owner, ResConv) else [])
        enclosing = [self.model.get_submodule(name.rsplit(".", k)[0]) for k in range(1, name.count(".") + 1)]
        for item in self.ignored_layers:
            if isinstance(item, str) and (item == name or _inside(name, item)):
                return True
            if isinstance(item, type) and any(isinstance(m, item) for m in related + enclosing):
                return True
            if isinstance(item, nn.Module) and any(m is item for m in related + enclosing):
                return True
        return False

    @property
    def gates(self) -> Dict[str, float]:
        """``{name: gamma}`` of the gates this pruner regularises and may remove."""
        return {n: g.gamma.item() for n, g in self._gates.items()}

    def penalty(self, reg: Optional[float] = None) -> torch.Tensor:
        """The L1 term ``reg * sum(|gamma|)``, to add to the loss instead of calling :meth:`regularize`."""
        return self.regularizer.penalty([g.gamma for g in self._gates.values()], reg)

    # ------------------------------------------------------------------------------------- regularisation
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the per-step work (proximal step, budget cap) after each ``optimizer.step()`` that follows a
        ``regularize()`` call."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = OptimizerHook(optimizer, self._after_optimizer_step)

    def detach(self) -> None:
        """Stop acting after the attached optimizer's steps (e.g. once sparsity training ends)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = None

    @property
    def budget_cap(self) -> Optional[float]:
        """The cap on the budgeted gates after the steps done so far: 1 falling to exactly 0 (None without a
        budget-driven cap, or before ``cap_start``). While it falls the training loss may rise: the budget's doing,
        not the learning rate's (the training stage's divergence guard reads it)."""
        return self.schedule.cap(self.steps_done) if self._budget_driven() else None

    def _budget_driven(self) -> bool:
        return self.sparsity_steps is not None and self._budget_kind() is not None

    def regularize(self, model: Optional[nn.Module] = None, reg: Optional[float] = None) -> None:
        """Apply the L1 pressure for this training step; call after ``loss.backward()``, before ``optimizer.step()``.

        Args:
            model: accepted for torch-pruning compatibility (the pruner acts on the model it was built with; a
                DistributedDataParallel wrapper of it is fine).
            reg: overrides the strength for this step.
        """
        if model is not None:
            check_module(model)
        self.importance.observe(self._gates)
        self.regularizer.before_step([g.gamma for g in self._gates.values()], reg)
        needs_hook = self.mode == "proximal" or self._budget_driven()
        if not needs_hook:
            self.steps_done += 1
            return
        if self._hook is None:
            raise ValueError(f"mode={self.mode!r}{' with a budget cap' if self._budget_driven() else ''} acts after "
                             "optimizer.step(): pass optimizer=... to LayerPruner or call pruner.attach(optimizer) "
                             "once")
        self._pending_reg = self.reg if reg is None else float(reg)
        self._hook.arm()

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        gammas = [g.gamma for g in self._gates.values()]
        self.regularizer.after_step(gammas, self._hook.lr_of, self._pending_reg)
        self._apply_budget_cap()
        self.steps_done += 1
        for gamma in gammas:
            if gamma.item() == 0.0:
                self._hook.clear_state(gamma)

    def _apply_budget_cap(self) -> None:
        if not self._budget_driven():
            return
        cap = self.schedule.cap(self.steps_done + 1)  # the cap after this step (steps_done counts the ones before)
        if cap is None:
            return  # before cap_start: training alone
        if self._due_for_selection(cap):
            self._reselect()
        for name in self._selected:
            self._gates[name].gamma.clamp_(0.0, cap)

    def _due_for_selection(self, cap: float) -> bool:
        if self._selected is None:
            return True
        if cap <= 0.0 or self.reselect_every is None:
            return False
        return self.steps_done - self._selected_at >= self.reselect_every

    def _reselect(self) -> None:
        previous = self._selected
        bonus = {n: 1.0 - self.hysteresis for n in previous or []}
        chosen = self.rank(bonus=bonus)
        self._selected, self._selected_at = chosen, self.steps_done
        self.importance.reset()
        if previous is not None and set(previous) != set(chosen):
            self.reselections.append({"step": self.steps_done, "added": sorted(set(chosen) - set(previous)),
                                      "dropped": sorted(set(previous) - set(chosen))})

    # ------------------------------------------------------------------------------------------ selection
    def _budget_kind(self) -> Optional[str]:
        if self.flops_reduction is not None:
            return "flops"
        if self.latency_reduction is not None:
            return "latency"
        return "ratio" if self.pruning_ratio is not None else None

    def savings(self, kind: str = "flops") -> tuple:
        """``({name: what removing it saves}, total)`` in FLOPs or seconds of the deployed model (cached).

        FLOPs: :func:`~resconv_plugin.pruning.flops_savings`; latency: the lookup table
        :func:`~resconv_plugin.pruning.latency_table` measured at ``example_inputs``.
        """
        if kind not in ("flops", "latency"):
            raise ValueError(f"kind must be 'flops' or 'latency', got {kind!r}")
        if kind not in self._costs:
            if kind == "flops":
                self._costs[kind] = flops_savings(self.model, list(self._gates), self.example_inputs)
            else:
                self._costs[kind] = latency_table(self.model, list(self._gates), self.example_inputs,
                                                  repeats=self.latency_repeats,
                                                  channels_last=self.latency_channels_last,
                                                  device=self.latency_device)
        return self._costs[kind]

    def _target(self) -> tuple:
        kind = self._budget_kind()
        saved, total = self.savings(kind)
        fraction = self.flops_reduction if kind == "flops" else self.latency_reduction
        return saved, total, fraction * total

    def _check_reachable(self) -> None:
        saved, total, target = self._target()
        kind = self._budget_kind()
        names = list(self._gates)
        reachable = set_saving(saved, names)
        if _short(reachable, target) and kind == "latency":
            # the table is scaled to one timing of removing every gate: one disturbed timing must not refuse the
            # budget (on a busy machine cifar_resnet20's 7 blocks read 0.47 of its latency, where 6 of them
            # measured 0.63 in another run): the median of three more decides
            whole = statistics.median(self._measure_saving(names) for _ in range(3))
            if whole >= self.latency_reduction:
                return
            reachable = whole * total
        if _short(reachable, target):  # the selection's own test: a goal at the maximum is reachable
            what = "flops_reduction" if kind == "flops" else "latency_reduction"
            raise ValueError(f"{what}={target / total:.3g} is unreachable: removing every prunable gate "
                             f"({len(names)}) removes at most {reachable / total:.3f} of the model's "
                             f"{'FLOPs' if kind == 'flops' else 'latency'}")

    def scores(self, removed: Sequence[str] = ()) -> Dict[str, float]:
        """The importance of every prunable gate (higher = keep), with ``removed`` taken as already at 0."""
        return self.importance(self.model, self._gates, inputs=self.calibration_inputs or self.example_inputs,
                               targets=self.calibration_targets, removed=removed)

    def rank(self, bonus: Optional[Dict[str, float]] = None) -> List[str]:
        """Choose, from the importance measured now, the gates that meet the budget (ignores a set chosen earlier).

        Args:
            bonus: score multipliers (< 1 favours a gate), e.g. the hysteresis on the current set.
        """
        kind = self._budget_kind()
        bonus = bonus or {}
        if kind is None:
            return [n for n in self._order if n in self._gates and abs(self._gates[n].gamma.item()) <= self.threshold]
        saved = self.savings("latency" if kind == "latency" else "flops")[0]

        def scored(removed: Sequence[str] = ()) -> Dict[str, float]:
            return {n: s * bonus.get(n, 1.0) for n, s in self.scores(removed).items()}

        if kind == "ratio":
            return select_count(scored(), math.floor(self.pruning_ratio * len(self._gates) + 1e-9), saved,
                                order=self._order)
        saved, _, target = self._target()
        if self.importance.iterative:
            memo: Dict[tuple, Dict[str, float]] = {}  # the model does not change within one ranking
            order = self._gate_order()

            def remembered(removed: Sequence[str] = ()) -> Dict[str, float]:
                key = tuple(sorted(removed))
                if key not in memo:
                    memo[key] = scored(removed)
                return memo[key]

            def choose(goal: float) -> List[str]:
                return select_iteratively(remembered, saved, goal, order=order)
        else:
            scores = scored()

            def choose(goal: float) -> List[str]:
                return select_within_budget(scores, saved, goal, order=self._order, method=self.selection)
        if kind == "latency":
            ranked_rest: Dict[tuple, List[str]] = {}  # the fit extends the same set several times: scored once

            def extended(goal: float, extra: int) -> List[str]:
                """``choose(goal)`` and the ``extra`` least important of the other gates (scored with that set
                removed; ties in module order): the latency fit's last resort when the table's whole saving
                measures short."""
                chosen = choose(goal)
                if extra <= 0:
                    return chosen
                taken = set(chosen)
                rest = [n for n in self._gate_order() if n not in taken]
                if extra >= len(rest):  # all of them: no order needed
                    return chosen + rest
                key = tuple(chosen)
                if key not in ranked_rest:
                    scores = scored(chosen)
                    ranked_rest[key] = sorted(rest, key=lambda n: scores.get(n, 0.0))
                return chosen + ranked_rest[key][:extra]

            target, extra = self._fit_latency_goal(extended)
            return extended(target, extra)
        return choose(target)

    def _gate_order(self) -> List[str]:
        """The prunable gates in module order."""
        return [n for n in self._order if n in self._gates]

    def _fit_latency_goal(self, extended) -> Tuple[float, int]:
        """(The goal, in the latency table's units, and a number of extra gates) whose set, ``extended(goal,
        extra)``, meets ``latency_reduction`` as *measured*.

        The table's per-gate entries are small next to timing noise on a busy machine and not additive, so their
        sum can miss by a lot (cifar_resnet20 at batch 1: 0.40 asked, 0.28 delivered; cifar_resnet56: the sets chosen
        measured 0.7-0.8 of their entries' sum). The first ranking closes the loop: it times the chosen set's
        deployed model against the full one (:func:`~resconv_plugin.pruning.measured_saving`) and chooses again with
        a corrected goal (at most ``_FIT_ROUNDS`` times) until the measured saving lies in [budget, budget + 0.02]:
        aiming at the middle of that window, by the table's error on the last set while every set measured fell on
        one side of it, then by linear interpolation between the closest sets on either side (a table whose error
        differs between sets, as for the largest entries, would make the first rule oscillate). One disturbed timing
        must not decide on which side of the budget a set falls, either way: a set whose first timing meets the
        budget or misses it by at most 0.02 is timed twice more and counts by the median of the three (on a
        busy machine one timing of five cifar_resnet20 layers once read 0.685 of the latency saved, the final model
        then measured 0.221; one timing of four cifar_resnet20 blocks read 0.397 of 0.40 asked, and the fit took a
        fifth block, ~0.1 of the latency, where the same four blocks timed 0.400 and 0.430 in another run). When the
        table's whole saving is chosen and still measures short (entries noise left at 0), the gates the table did
        not need are added, least important first: all of them are measured, and when that overshoots the window,
        their number is interpolated between the short set and all of them on the measured savings
        (``latency_fit["extra"]``; ``"every"``: all of them; a cifar_resnet56 run once measured the table's 34 gates at
        0.521 of 0.55 asked and all 52 at 0.832, and kept all 52 before this step existed). It keeps the smallest
        measured saving that met the budget (else the set that came closest; its index is ``latency_fit["best"]``).
        The goal's scale and the extra gates' number are kept in :attr:`latency_fit` (and :meth:`state_dict`) and
        reused by later rankings of the same budget, so re-ranking during sparsity training costs no timing and
        every process of a distributed run follows rank 0.
        """
        saved, total, target = self._target()
        fraction = self.latency_reduction
        reachable = set_saving(saved, list(self._gates))
        fit = self.latency_fit
        gates = len(self._gates)
        if fit is not None and fit["fraction"] == fraction:
            extra = fit.get("extra", gates if fit.get("every") else 0)  # "every" alone: a fit saved before "extra"
            return min(target * fit["scale"], reachable), extra
        aim = fraction + _FIT_TOLERANCE / 2
        rounds: List[Dict[str, Any]] = []
        goal, extra, adding_from = min(target, reachable), 0, None  # the round whose set the extra gates extend
        for _ in range(_FIT_ROUNDS):
            chosen = extended(goal, extra)
            if not chosen or any(r["removed"] == sorted(chosen) for r in rounds):
                break  # the correction lands on a set already measured
            measurements = [self._measure_saving(chosen)]
            if measurements[0] >= fraction - _FIT_TOLERANCE:  # near the budget or above: one disturbed timing
                measurements += [self._measure_saving(chosen) for _ in range(2)]  # must not decide: the median
            measured, predicted = statistics.median(measurements), set_saving(saved, chosen) / total
            rounds.append({"scale": goal / target, "extra": extra, "removed": sorted(chosen), "predicted": predicted,
                           "measured": measured, "measurements": measurements, "every": len(chosen) == gates})
            if fraction <= measured <= fraction + _FIT_TOLERANCE:
                break
            if adding_from is not None:  # the gates the table did not need, least important first: their number
                below = [r for r in rounds[adding_from:] if r["measured"] < fraction]
                above = [r for r in rounds[adding_from:] if r["measured"] >= fraction]
                if not above:
                    break  # all of them measured short too: the closest set counts
                lo = max(below, key=lambda r: r["extra"])
                hi = min(above, key=lambda r: r["extra"])
                if hi["extra"] - lo["extra"] <= 1:
                    break
                t = (aim - lo["measured"]) / max(hi["measured"] - lo["measured"], 1e-9)
                extra = min(max(lo["extra"] + math.ceil(t * (hi["extra"] - lo["extra"])), lo["extra"] + 1),
                            hi["extra"] - 1)
                continue
            if predicted * total >= reachable * (1 - 1e-9) and measured < fraction:
                # the table's whole saving chosen and still short: gates whose entries noise left at 0 were not
                # needed by the table; add them (all first, then as many as the budget needs)
                adding_from, extra = len(rounds) - 1, gates - len(chosen)
                continue
            goal = min(self._next_goal(rounds, aim) * total, reachable)
        if not rounds:
            return target, 0
        met = [r for r in rounds if r["measured"] >= fraction]
        best = min(met, key=lambda r: r["measured"]) if met else max(rounds, key=lambda r: r["measured"])
        self.latency_fit = {"fraction": fraction, "scale": best["scale"], "extra": best["extra"], "rounds": rounds,
                            "every": best["every"], "best": rounds.index(best)}
        return min(target * best["scale"], reachable), best["extra"]

    def _measure_saving(self, chosen: List[str]) -> float:
        """The measured latency saving of removing ``chosen`` together, as a fraction of the deployed model's."""
        seconds, full = measured_saving(self.model, chosen, self.example_inputs, repeats=self.latency_repeats,
                                        channels_last=self.latency_channels_last, device=self.latency_device)
        return seconds / full

    @staticmethod
    def _next_goal(rounds: List[Dict[str, Any]], aim: float) -> float:
        """The table's prediction (a fraction) whose set should measure ``aim``, from the rounds measured so far."""
        below = [r for r in rounds if r["measured"] < aim]
        above = [r for r in rounds if r["measured"] >= aim]
        if below and above:  # bracketed: interpolate between the closest sets on either side
            lo = max(below, key=lambda r: r["measured"])
            hi = min(above, key=lambda r: r["measured"])
            t = (aim - lo["measured"]) / max(hi["measured"] - lo["measured"], 1e-9)
            return lo["predicted"] + t * (hi["predicted"] - lo["predicted"])
        last = rounds[-1]
        return aim * last["predicted"] / max(last["measured"], 1e-3)  # the table's error on the last set

    def select(self) -> List[str]:
        """Names of the gates the next :meth:`step` removes.

        During and after budget-driven sparsity training: the set being annealed to 0. Otherwise: chosen now from
        the importance (:meth:`rank`), or by ``threshold`` on ``|gamma|``.

        Raises:
            ValueError: a FLOPs or latency target that removing every gate could not reach (the message names the
                largest reachable reduction).
        """
        if self._selected is not None:
            return list(self._selected)
        if self._budget_kind() in ("flops", "latency"):
            self._check_reachable()
        return self.rank()

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
        self._selected = self._selected_at = None
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

    # --------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs (like an optimizer's): steps done, the selected set, the cost tables (so every
        process and every resumption uses the same measured latencies), the criterion's accumulators."""
        return {"steps_done": self.steps_done, "selected": self._selected, "selected_at": self._selected_at,
                "costs": {k: (dict(v[0]), v[1]) for k, v in self._costs.items()},
                "importance": self.importance.state_dict(), "reselections": list(self.reselections),
                "latency_fit": self.latency_fit}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on a pruner built for the same model and gates)."""
        self._check_state(state)
        self.steps_done = int(state["steps_done"])
        self._selected = list(state["selected"]) if state.get("selected") is not None else None
        self._selected_at = state.get("selected_at")
        self._take_measurements(state)
        self.importance.load_state_dict(state.get("importance") or {})
        self.reselections = list(state.get("reselections") or [])

    def _check_state(self, state: object) -> None:
        if not isinstance(state, dict) or "steps_done" not in state:
            raise TypeError(f"state must be a dict from LayerPruner.state_dict(), got {type(state).__name__}")
        unknown = [n for n in (state.get("selected") or []) if n not in self._gates]
        if unknown:
            raise ValueError(f"the saved selection names gates this pruner does not have: {unknown[:5]}")

    def _take_measurements(self, state: Dict[str, Any]) -> None:
        """The cost tables and the latency fit of ``state`` (what this pruner would otherwise measure)."""
        self._costs = {k: (dict(v[0]), float(v[1])) for k, v in (state.get("costs") or {}).items()}
        self.latency_fit = state.get("latency_fit")
