"""``LayerPruner``: depth pruning in torch-pruning's pruner protocol, composed of an importance criterion, a cost
table, a selection rule (with the latency fit), the budget cap schedule and the L1 regulariser.

The pruner holds the state and the protocol (``regularize`` / ``step`` / ``state_dict``); the parts that decide live in
their own modules: :mod:`~resconv_plugin.pruning.importance` (scores), :mod:`~resconv_plugin.pruning.cost` (savings;
:class:`~resconv_plugin.pruning.cost.GateCosts` keeps the pruner's tables and latency fit and checks that a budget is
reachable), :mod:`~resconv_plugin.pruning.select` (the set for a goal, :class:`~resconv_plugin.pruning.BudgetChooser`),
:mod:`~resconv_plugin.pruning.latency_fit` (the goal of a latency budget, by measurement),
:mod:`~resconv_plugin.pruning.schedule` (the cap) and :mod:`~resconv_plugin.pruning.regularizer` (the L1, after the
optimizer's step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from resconv_plugin._checks import check_fraction, check_int
from resconv_plugin._deprecation import warn_renamed
from resconv_plugin.nn.resconv import ResConv
from resconv_plugin.fx.graph import trace
from resconv_plugin.fx.surgery import Removal, gated_modules, remove
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode, run_example
from resconv_plugin.pruning.calibration import recalibrate_batchnorm
from resconv_plugin.measure.latency_cost import LatencyCost
from resconv_plugin.pruning.cost import GateCosts, timing_cost
from resconv_plugin.pruning.importance import GateImportance, GateMagnitudeImportance, make_importance
from resconv_plugin.pruning.regularizer import MODES, L1Regularizer, L1Step
from resconv_plugin.pruning.schedule import CapSchedule
from resconv_plugin.pruning.select import METHODS, BudgetChooser, select_count

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


@torch.no_grad()
def remove_measured(model: nn.Module, names: Sequence[str], inputs: Tuple[torch.Tensor, ...], *,
                    recalibrate_bn: bool = False) -> StepReport:
    """Remove the gates ``names`` from ``model`` (in place) and measure the output change on ``inputs`` (eval mode).

    Args:
        model: the gated model.
        names: the gates to remove (:func:`~resconv_plugin.fx.surgery.remove`).
        inputs: the batch the change is measured on (and BatchNorm statistics re-estimated on).
        recalibrate_bn: after removing gates that were not 0, re-estimate every BatchNorm's running statistics.

    Example:
        >>> report = remove_measured(model, ["layer1.0.conv1"], (x,))  # doctest: +SKIP
        >>> report.max_abs_change  # doctest: +SKIP
        0.0
    """
    with eval_mode(model):
        before = run_example(model, inputs)
        removed = remove(model, names)
        after = model(*inputs)
    scale = before.abs().max().item() or 1.0
    report = StepReport(removed=removed, max_abs_change=(after - before).abs().max().item())
    report.relative_change = report.max_abs_change / scale
    if recalibrate_bn and any(r.gamma != 0.0 for r in removed):
        recalibrate_batchnorm(model, inputs)
        with eval_mode(model):
            report.change_after_recalibration = (model(*inputs) - before).abs().max().item()
        report.recalibrated = True
    return report


def _check_fraction(name: str, value: Optional[float], upper_inclusive: bool = False) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(check_fraction(name, value, high_open=not upper_inclusive))


def _check_arguments(calibration_inputs: Optional[ExampleInputs], calibration_targets: Optional[torch.Tensor],
                     sparsity_steps: Optional[int], selection: str, reselect_every: Optional[int],
                     hysteresis: float, latency_repeats: Optional[int], ignored_layers: List[object]) -> None:
    """The checks of :class:`LayerPruner`'s plain arguments: a TypeError or ValueError naming the argument, the value
    and what is allowed."""
    if calibration_targets is not None and not isinstance(calibration_targets, torch.Tensor):
        raise TypeError(f"calibration_targets must be a tensor of class indices, got "
                        f"{type(calibration_targets).__name__}")
    if calibration_targets is not None and calibration_inputs is None:
        raise ValueError("calibration_targets are the labels of calibration_inputs: pass both")
    if sparsity_steps is not None:  # None is allowed, yet not named in the message (as for latency_repeats)
        check_int("sparsity_steps", sparsity_steps, 1)
    if selection not in METHODS:
        raise ValueError(f"selection must be one of {METHODS}, got {selection!r}")
    check_int("reselect_every", reselect_every, 1, optional=True)
    check_fraction("hysteresis", hysteresis, high_open=True)
    if latency_repeats is not None:
        check_int("latency_repeats", latency_repeats, 1)
    for item in ignored_layers:
        if not isinstance(item, (str, nn.Module, type)):
            raise TypeError(f"ignored_layers entries must be names, modules or module classes, got "
                            f"{type(item).__name__}")


def _latency_settings(example_inputs: Tuple[torch.Tensor, ...], cost: Optional[LatencyCost], repeats: Optional[int],
                      channels_last: bool, device: Union[str, torch.device, None]) -> tuple:
    """``(latency_cost, latency_repeats, latency_channels_last, latency_device)`` of :class:`LayerPruner`: ``cost``,
    or eager PyTorch timing as the other arguments say (:func:`~resconv_plugin.pruning.cost.timing_cost`); the device
    is None unless ``cost`` or ``device`` is given."""
    cost_given = cost is not None
    cost = timing_cost(example_inputs, cost, repeats=repeats, channels_last=channels_last, device=device,
                       prefix="latency_")
    return cost, cost.repeats, cost.channels_last, cost.device if cost_given or device is not None else None


def _checked_budgets(threshold: Optional[float], gate_ratio: Optional[float], flops_reduction: Optional[float],
                     latency_reduction: Optional[float]) -> Tuple[Optional[float], ...]:
    """The selection of :class:`LayerPruner`, checked: ``(threshold, gate_ratio, flops_reduction, latency_reduction)``
    with at most one given (:func:`given_budget`) and ``threshold`` 0.0 when none is."""
    given = given_budget(threshold=threshold, gate_ratio=gate_ratio, flops_reduction=flops_reduction,
                         latency_reduction=latency_reduction)
    return (_check_fraction("threshold", threshold, upper_inclusive=True) if given else 0.0,
            *(_check_fraction(k, v) for k, v in (("gate_ratio", gate_ratio), ("flops_reduction", flops_reduction),
                                                  ("latency_reduction", latency_reduction))))


def _history_names(history: object, gates: Dict[str, nn.Module]) -> List[str]:
    """The gates a :meth:`LayerPruner.pruning_history` removed, each checked to be among ``gates``."""
    if not isinstance(history, (list, tuple)) or not all(isinstance(h, dict) and "name" in h for h in history):
        raise TypeError("history must be a list of dicts with a 'name', as returned by pruning_history()")
    missing = [h["name"] for h in history if h["name"] not in gates]
    if missing:
        raise ValueError(f"pruning history names gates this model does not have: {missing[:5]}")
    return [h["name"] for h in history]


def _check_state(state: object, gates: Dict[str, nn.Module], costs: GateCosts) -> None:
    """Raise when ``state`` is not a :meth:`LayerPruner.state_dict` of a pruner of ``gates`` timing as ``costs``."""
    if not isinstance(state, dict) or "steps_done" not in state:
        raise TypeError(f"state must be a dict from LayerPruner.state_dict(), got {type(state).__name__}")
    unknown = [n for n in (state.get("selected") or []) if n not in gates]
    if unknown:
        raise ValueError(f"the saved selection names gates this pruner does not have: {unknown[:5]}")
    costs.check_state(state)


def _prunable_gates(model: nn.Module, ignored_layers: Sequence[object]) -> Tuple[Dict[str, nn.Module], List[str]]:
    """``({name: gate} of the gates that may go, every gate's name in module order)``."""
    all_gates = gated_modules(model, trace(model))
    if not all_gates:
        raise ValueError(f"{type(model).__name__} has no ResConv layer or gated block: call "
                         "resconv_plugin.convert(model, example_inputs) (level='layer' or 'block') first")
    return {n: g for n, g in all_gates.items() if not _is_ignored(model, n, g, ignored_layers)}, list(all_gates)


def _is_ignored(model: nn.Module, name: str, gate: nn.Module, ignored_layers: Sequence[object]) -> bool:
    """Whether ``ignored_layers`` (names, modules, module classes) cover the gate ``name``: its owner (the ResConv,
    or the block), the gate, a ResConv's conv, or a module that encloses them."""
    owner = model.get_submodule(name)
    related = [owner, gate] + ([owner.conv] if isinstance(owner, ResConv) else [])
    enclosing = [model.get_submodule(name.rsplit(".", k)[0]) for k in range(1, name.count(".") + 1)]
    for item in ignored_layers:
        if isinstance(item, str) and (item == name or name.startswith(f"{item}.")):
            return True
        if isinstance(item, type) and any(isinstance(m, item) for m in related + enclosing):
            return True
        if isinstance(item, nn.Module) and any(m is item for m in related + enclosing):
            return True
    return False


#: The ways to say what to remove; a pruner takes at most one (none: ``threshold=0.0``).
BUDGETS = ("threshold", "gate_ratio", "flops_reduction", "latency_reduction")


def _renamed_ratio(gate_ratio: Optional[float], pruning_ratio: Optional[float]) -> Optional[float]:
    """``gate_ratio``, or the deprecated ``pruning_ratio`` (its name before: torch-pruning's name for a fraction of
    *channels*), with a FutureWarning."""
    if pruning_ratio is None:
        return gate_ratio
    warn_renamed("pruning_ratio (a fraction of the gates)", "gate_ratio (torch-pruning's pruning_ratio is a fraction "
                 "of the channels)", stacklevel=4)
    if gate_ratio is not None:
        raise ValueError(f"pass gate_ratio only (pruning_ratio is its deprecated name), got gate_ratio={gate_ratio!r} "
                         f"and pruning_ratio={pruning_ratio!r}")
    return pruning_ratio


def given_budget(**budgets: Optional[float]) -> Optional[Tuple[str, float]]:
    """The one budget among ``budgets`` (keyword: value, None = not given) that is given, as ``(name, value)``;
    None when none is. The single check of the one-budget rule (:class:`LayerPruner`, the ``resconv`` command).
    ``pruning_ratio`` is read as ``gate_ratio``, with a FutureWarning (its name before this release).

    Raises:
        ValueError: a name outside :data:`BUDGETS`, or more than one budget given.

    Example:
        >>> given_budget(flops_reduction=0.5, threshold=None)
        ('flops_reduction', 0.5)
    """
    if "pruning_ratio" in budgets:
        budgets = dict(budgets)
        budgets["gate_ratio"] = _renamed_ratio(budgets.get("gate_ratio"), budgets.pop("pruning_ratio"))
    unknown = sorted(set(budgets) - set(BUDGETS))
    if unknown:
        raise ValueError(f"unknown budget {', '.join(unknown)}: the budgets are {', '.join(BUDGETS)}")
    given = [(k, v) for k, v in budgets.items() if v is not None]
    if len(given) > 1:
        raise ValueError(f"give exactly one selection mode (threshold, gate_ratio, flops_reduction or "
                         f"latency_reduction), got {len(given)}: {', '.join(k for k, _ in given)}")
    return given[0] if given else None


class LayerPruner:
    """Depth pruner for models converted with :func:`resconv_plugin.convert`, in torch-pruning's pruner protocol.

    During sparsity training call ``regularize(model)`` after ``loss.backward()`` and before ``optimizer.step()`` (as
    with torch-pruning's ``BNScalePruner``); then ``step()`` removes the selected layers (ResConv) and blocks
    (BlockGate) and returns their names. Every gate is a ``gamma`` in [0, 1]: 1 = the layer as it was, 0 = the
    identity. The Python guide (its *Depth pruning* page) tells each part at length.

    **Selection** (one at most; default ``threshold=0.0``: the gates at exactly 0): ``threshold`` on ``|gamma|``;
    ``gate_ratio``, a fraction of the (not ignored) gates (``pruning_ratio``, its deprecated name, counts *channels* in
    torch-pruning); ``flops_reduction``, a fraction of the deployed model's FLOPs; ``latency_reduction``, a fraction of
    its latency measured on this machine in the runtime of ``latency_cost`` (a :class:`~resconv_plugin.LatencyCost`;
    default: eager PyTorch) (:attr:`latency_fit`: the set's timing corrects the table's goal). Budgets are met at the
    least total importance (``selection="dp"`` exactly, or ``"greedy"``) by a criterion (``importance=``):
    ``"magnitude"`` (``|gamma|``), ``"removal"`` (the loss increase when the gate is set to 0 on
    ``calibration_inputs``), ``"removal-iterative"``, ``"taylor"``, or a
    :class:`~resconv_plugin.pruning.GateImportance`.

    **Budget-driven sparsity**: with a budget and ``sparsity_steps`` (the ``regularize()`` calls you will make), the
    selected gates are capped by 1 until ``cap_start``, falling to exactly 0 at ``zero_at`` (fractions of the steps);
    the set is re-ranked every ``reselect_every`` steps until then (default: every step for magnitude, else never).

    **Regularisation**: ``mode="proximal"`` (default) soft-thresholds ``gamma <- clamp(gamma - lr * reg, 0, 1)`` after
    the ``optimizer.step()`` that follows ``regularize()`` (exact zeros), at the learning rate of the ``optimizer=``
    given (or :meth:`attach` ed), else of whichever optimizer steps the gates; the budget cap acts there too.
    ``mode="subgradient"`` adds ``reg * sign(gamma)`` to the gradients, as ``BNScalePruner``. ``reg`` defaults to 1e-2
    for magnitude and threshold selection, else 0.

    Args:
        model, example_inputs: a model holding ResConv layers and/or BlockGates; the deployment input.
        importance, reg, mode: the criterion, the L1 strength (per unit learning rate) and mode (above).
        threshold, gate_ratio, flops_reduction, latency_reduction: the selection (one at most).
        ignored_layers: gates never removed nor regularised: names, modules or module classes, each covering the
            module and everything inside it (as in torch-pruning).
        optimizer: the optimizer that updates the gates (optional: see Regularisation).
        sparsity_steps, zero_at, cap_start, reselect_every: budget-driven sparsity (above).
        calibration_inputs, calibration_targets: real inputs (and their class labels) for data-driven importance and
            the output-change measure of ``step()`` (default: ``example_inputs``).
        selection, hysteresis: ``"dp"`` or ``"greedy"``; the advantage in [0, 1) the current set keeps at a re-ranking.
        latency_cost: how latency is timed: the runtime you deploy to (eager, ``torch.compile``, ONNX Runtime, OpenVINO,
            TensorRT), its batch size, threads, device and repeats (:class:`~resconv_plugin.LatencyCost`); default:
            eager PyTorch built from ``latency_repeats``, ``latency_channels_last`` and ``latency_device`` (how and
            where it times the latency table; default 20 repeats), which are then left out.
        state: a :meth:`state_dict` of a pruner of the same model and settings (e.g. rank 0's in a distributed run):
            its cost tables and latency fit are used instead of measuring again.
        pruning_ratio: the deprecated name of ``gate_ratio``.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        >>> _ = resconv_plugin.convert(model, x)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> pruner = resconv_plugin.LayerPruner(model, x[:1], flops_reduction=0.3, sparsity_steps=100)
        >>> for _ in range(100):  # your training loop
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     opt.zero_grad(); loss.backward()
        ...     pruner.regularize(model)  # no optimizer given: the proximal step follows opt.step()
        ...     opt.step()
        >>> removed = pruner.step()  # the layers meeting the budget, all at gamma == 0
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, *,
                 importance: Union[str, GateImportance] = "magnitude", reg: Optional[float] = None,
                 mode: str = "proximal", threshold: Optional[float] = None, gate_ratio: Optional[float] = None,
                 flops_reduction: Optional[float] = None, latency_reduction: Optional[float] = None,
                 ignored_layers: Optional[IgnoredLayers] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 sparsity_steps: Optional[int] = None, zero_at: float = 0.75, cap_start: float = 0.0,
                 calibration_inputs: Optional[ExampleInputs] = None, calibration_targets: Optional[torch.Tensor] = None,
                 selection: str = "dp", reselect_every: Optional[int] = None, hysteresis: float = 0.0,
                 latency_repeats: Optional[int] = None, latency_channels_last: bool = False,
                 latency_device: Union[str, torch.device, None] = None, latency_cost: Optional[LatencyCost] = None,
                 state: Optional[Dict[str, Any]] = None, pruning_ratio: Optional[float] = None) -> None:
        self.model = check_module(model)
        self.example_inputs = as_input_tuple(example_inputs)
        self.ignored_layers = list(ignored_layers or [])
        _check_arguments(calibration_inputs, calibration_targets, sparsity_steps, selection, reselect_every,
                         hysteresis, latency_repeats, self.ignored_layers)
        self.calibration_inputs = as_input_tuple(calibration_inputs) if calibration_inputs is not None else None
        self.calibration_targets = calibration_targets
        self.importance = make_importance(importance)
        self.threshold, self.gate_ratio, self.flops_reduction, self.latency_reduction = _checked_budgets(
            threshold, _renamed_ratio(gate_ratio, pruning_ratio), flops_reduction, latency_reduction)
        magnitude = isinstance(self.importance, GateMagnitudeImportance)
        default_reg = 1e-2 if magnitude or self._budget_kind() is None else 0.0
        self.regularizer = L1Regularizer(mode, default_reg if reg is None else reg)
        self._l1 = L1Step(self.regularizer, self._gammas, self._after_optimizer_step)
        self.schedule = CapSchedule(sparsity_steps or 1, zero_at, cap_start)
        self.sparsity_steps, self.selection, self.hysteresis = sparsity_steps, selection, float(hysteresis)
        self.reselect_every = reselect_every if reselect_every is not None else (1 if magnitude else None)
        # latency_cost: how latency is timed (runtime, batch size, threads, device, repeats)
        self.latency_cost, self.latency_repeats, self.latency_channels_last, self.latency_device = _latency_settings(
            self.example_inputs, latency_cost, latency_repeats, latency_channels_last, latency_device)
        self.steps_done, self.last_step, self.reselections, self._history = 0, None, [], []
        self._selected: Optional[List[str]] = None
        self._selected_at: Optional[int] = None
        self.update_regularizer()
        if not self._gates:
            raise ValueError(f"ignored_layers cover all {len(self._order)} gates of {type(model).__name__}: nothing "
                             "is left to prune")
        if state is not None:
            _check_state(state, self._gates, self.costs)
            self.costs.load_state_dict(state)  # nothing below times again
        self._check_reachable()  # fail early on an unreachable target
        if self._budget_driven() and self.schedule.started(0):
            self._reselect()  # chosen from the model as given, before training moves it
        if state is not None:
            chosen, fit = (self._selected, self._selected_at), self.latency_fit
            self.load_state_dict(state)
            if self._selected is None:  # a state without a selection (e.g. a reachability check's tables only)
                (self._selected, self._selected_at), self.costs.fit = chosen, self.latency_fit or fit
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
        self._gates, self._order = _prunable_gates(self.model, self.ignored_layers)
        #: What removing each gate saves (FLOPs, measured latency) and the latency fit, for the gates as they are.
        self.costs = GateCosts(self.model, self.example_inputs, self.latency_cost)

    @property
    def latency_fit(self) -> Optional[Dict[str, Any]]:
        """The measured correction of a latency budget's goal (:meth:`rank`), None before one is made."""
        return self.costs.fit

    @property
    def gates(self) -> Dict[str, float]:
        """``{name: gamma}`` of the gates this pruner regularises and may remove."""
        return {n: g.gamma.item() for n, g in self._gates.items()}

    def penalty(self, reg: Optional[float] = None) -> torch.Tensor:
        """The L1 term ``reg * sum(|gamma|)``, to add to the loss instead of calling :meth:`regularize`."""
        return self.regularizer.penalty(self._gammas(), reg)

    def _gammas(self) -> List[nn.Parameter]:
        return [g.gamma for g in self._gates.values()]

    # ------------------------------------------------------------------------------------- regularisation
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the per-step work (proximal step, budget cap) after each ``optimizer.step()`` that follows a
        ``regularize()`` call (without it: after the step of whichever optimizer holds the gates)."""
        self._l1.attach(optimizer)

    def detach(self) -> None:
        """Stop acting after the optimizer's steps (e.g. once sparsity training ends)."""
        self._l1.detach()

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
        if not self._l1.regularize(reg, after_optimizer=self.mode == "proximal" or self._budget_driven()):
            self.steps_done += 1  # nothing to do after the optimizer's step

    def _after_optimizer_step(self) -> None:
        """The budget cap after the optimizer's step (after the proximal step; called by :class:`L1Step`)."""
        cap = self.schedule.cap(self.steps_done + 1) if self._budget_driven() else None  # the cap after this step
        if cap is not None:  # None: no cap, or before cap_start (training alone)
            chosen_at = None if self._selected is None else self._selected_at
            if self.schedule.reranks(self.steps_done, chosen_at, self.reselect_every):
                self._reselect()
            for name in self._selected:
                self._gates[name].gamma.clamp_(0.0, cap)
        self.steps_done += 1

    def _reselect(self) -> None:
        previous = self._selected
        chosen = self.rank(bonus={n: 1.0 - self.hysteresis for n in previous or []})
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
        return "ratio" if self.gate_ratio is not None else None

    def savings(self, kind: str = "flops") -> tuple:
        """``({name: what removing it saves}, total)`` in FLOPs or seconds of the deployed model (cached).

        FLOPs: :func:`~resconv_plugin.pruning.flops_savings`; latency: the lookup table
        :func:`~resconv_plugin.pruning.latency_table` measured at ``example_inputs``.
        """
        return self.costs.savings(kind, list(self._gates))

    def _check_reachable(self) -> None:
        kind = self._budget_kind()
        if kind in ("flops", "latency"):
            fraction = self.flops_reduction if kind == "flops" else self.latency_reduction
            self.costs.check_reachable(kind, fraction, list(self._gates))

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

        def scored(removed: Sequence[str] = ()) -> Dict[str, float]:
            return {n: s * bonus.get(n, 1.0) for n, s in self.scores(removed).items()}

        if kind == "ratio":
            return select_count(scored(), math.floor(self.gate_ratio * len(self._gates) + 1e-9),
                                self.savings("flops")[0], order=self._order)
        saved, total = self.savings(kind)
        choose = BudgetChooser(scored, saved, candidates=[n for n in self._order if n in self._gates],
                               order=self._order, iterative=self.importance.iterative, method=self.selection)
        if kind == "flops":
            return choose(self.flops_reduction * total)
        return choose(*self.costs.latency_goal(choose, self.latency_reduction, list(self._gates)))

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
        self._check_reachable()
        return self.rank()

    # ------------------------------------------------------------------------------------------- removal
    @torch.no_grad()
    def step(self, *, calibration_inputs: Optional[ExampleInputs] = None, recalibrate_bn: bool = False) -> List[str]:
        """Remove the selected layers / blocks from the model (in place) and return the names removed (a selected
        layer inside a selected block goes with the block). The output change, measured on the calibration inputs
        (these, else the pruner's, else ``example_inputs``) in eval mode, is kept in :attr:`last_step`: exactly 0
        when every removed gate was 0.

        Args:
            calibration_inputs: a batch for the output-change measurement (and BatchNorm re-estimation).
            recalibrate_bn: after removing gates that were not 0, re-estimate every BatchNorm's running statistics
                on the calibration batch (cumulative average over one forward pass in training mode).
        """
        calib = as_input_tuple(calibration_inputs) if calibration_inputs is not None else (
            self.calibration_inputs or self.example_inputs)
        self.last_step = remove_measured(self.model, self.select(), calib, recalibrate_bn=recalibrate_bn)
        removed = self.last_step.removed
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
        self._history.extend(remove(self.model, _history_names(history, self._gates)))
        self.update_regularizer()

    # --------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs (like an optimizer's): steps done, the selected set, the cost tables (so every
        process and every resumption uses the same measured latencies), the criterion's accumulators."""
        return {"steps_done": self.steps_done, "selected": self._selected, "selected_at": self._selected_at,
                **self.costs.state_dict(), "importance": self.importance.state_dict(),
                "reselections": list(self.reselections)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on a pruner built for the same model and gates)."""
        _check_state(state, self._gates, self.costs)
        self.steps_done = int(state["steps_done"])
        self._selected = list(state["selected"]) if state.get("selected") is not None else None
        self._selected_at = state.get("selected_at")
        self.costs.load_state_dict(state)
        self.importance.load_state_dict(state.get("importance") or {})
        self.reselections = list(state.get("reselections") or [])
