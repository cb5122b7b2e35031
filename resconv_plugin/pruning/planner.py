"""``JointPlanner``: one latency (or FLOPs) budget, planned between removing layers and removing channels.

It is a planner, not a pruner in torch-pruning's sense (it has no ``regularize()`` / ``step()``): it measures a few
candidate structures that meet the budget, scores them and says which to train. Depth goes first, then width, as
the joint methods that work do (CKA layer pruning + L1 filters on ResNet-56: 84.7% of the FLOPs removed at -0.94 pt,
Pons et al. 2024). The candidates:

* ``"depth"``: the depth recipe's own plan, the gates of least importance whose removal meets the whole budget
  (``LayerPruner.rank()``: the same criteria and selection as the depth pruner); topped up with channels only when
  removing every gate cannot reach the budget.
* ``"depth+width"``: the same plan with its ``k`` most important gates kept (``k = 1 .. top_ups``), channels pruned
  until the budget is met. Whole blocks are coarse: on cifar_resnet20 at 0.45 of the latency the depth plan needs
  6 of its 7 blocks and lands at 0.36, where 5 blocks and a few channels land on 0.45.
* ``"width"``: channels alone (torch-pruning's ``MetaPruner``, global, ``GroupTaylorImportance`` by default: the
  best channel pruner of benchmark 8), for networks where depth does not pay.

Every candidate is built the same way, and so is the model the workflow trains: the channels are pruned first, on
the converted (unpruned) model at the candidate's ``channel_ratio`` (the same ratio on the same weights and
calibration batch gives the same structure), then its ``depth_names`` are removed. The ratio is bisected on the
cost of that deployed structure (:func:`~resconv_plugin.pruning.bisect_ratio`; latency read at the median of three
timings per try, in the runtime of ``latency_cost``), so the plan is trained at its final widths and never
re-bisected after training.

``score(candidate, model)`` ranks the candidates (lower is better). Without one, the one-shot proxy: the
calibration loss of the candidate's structure (its depth gates at 0, BatchNorm statistics re-estimated on the
calibration batch). One-shot scores rank wrecks at deep budgets (``benchmarks/results/joint_proxy.md``: every split
of cifar_resnet20 at 0.45 near chance): the workflow passes a score that trains each candidate briefly, the way
its full schedule would (``resconv_plugin.workflow``'s ``--joint-recovery-steps``).

Example:
    >>> import timm, torch, resconv_plugin
    >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    >>> x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    >>> _ = resconv_plugin.convert(model, x[:1], level="block")
    >>> plan = JointPlanner(model, x[:1], 0.4, calibration_inputs=x, calibration_targets=y, cost="flops").plan()
    >>> plan.best.kind in ("depth", "depth+width", "width") and plan.best.cost_rel <= 0.6
    True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from resconv_plugin._checks import Interval, check_int, check_number
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode
from resconv_plugin.deploy.fold import deployed
from resconv_plugin.fx.surgery import gated_modules, remove
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.measure.latency_cost import LatencyCost
from resconv_plugin.pruning.bisect import bisect_ratio
from resconv_plugin.pruning.cost import timing_cost
from resconv_plugin.pruning.calibration import calibration_loss, output_divergence, recalibrate_batchnorm
from resconv_plugin.pruning.importance import GateImportance
from resconv_plugin.pruning.select import set_saving

__all__ = ["JointPlanner", "JointPlan", "PlanCandidate", "KINDS"]

Cost = Union[str, LatencyCost, Callable[[nn.Module], float]]
#: The kinds of candidate a plan holds.
KINDS = ("depth", "depth+width", "width")


@dataclass
class PlanCandidate:
    """One structure that meets the budget, measured.

    Attributes:
        kind: ``"depth"``, ``"depth+width"`` or ``"width"``.
        depth_names: the gates removed.
        channel_ratio: torch-pruning's ``pruning_ratio`` (global, on the converted model before the layers go) that
            met the rest of the budget (0: none).
        cost_rel: the deployed structure's cost relative to the deployed baseline's.
        score: the score that ranked it (lower is better); None until scored.
    """

    kind: str
    depth_names: List[str]
    channel_ratio: float
    cost_rel: float
    score: Optional[float] = None


@dataclass
class JointPlan:
    """The candidates measured and the best one.

    Attributes:
        target_rel: the cost to reach, relative to the unpruned model's.
        candidates: the candidates that met the budget, scored.
        unreachable: the kinds (``"width"``, ``"depth+width k"``) that could not reach it.
    """

    target_rel: float
    candidates: List[PlanCandidate] = field(default_factory=list)
    unreachable: List[str] = field(default_factory=list)

    @property
    def best(self) -> PlanCandidate:
        """The candidate of the lowest score; a score that is not finite ranks last, ties go to the more depth."""
        def rank(c: PlanCandidate) -> tuple:
            finite = c.score is not None and math.isfinite(c.score)
            return (not finite, c.score if finite else 0.0, -len(c.depth_names), c.channel_ratio)

        return min(self.candidates, key=rank)


class JointPlanner:
    """Plan one budget between removing layers (depth first) and channels (see the module docstring).

    Args:
        model: a converted model (ResConv layers and / or gated blocks); not changed.
        example_inputs: the deployment input (batch size of the latency measurement, input of FLOP counts).
        reduction: the fraction of the cost to remove, in (0, 1).
        calibration_inputs: a batch of real inputs (importance, channel importance, one-shot score).
        calibration_targets: their labels (task loss; without, the model's own predictions serve as labels).
        cost: ``"latency"``, ``"flops"``, a :class:`~resconv_plugin.LatencyCost` (latency timed with it) or
            ``callable(deployed_model) -> float``.
        importance: the depth criterion (as ``LayerPruner(importance=...)``; the default recipe's for block gates).
        channel_importance: torch-pruning importance of the channel part (default ``GroupTaylorImportance``, whose
            gradients come from one backward pass on the calibration batch).
        round_to: torch-pruning's ``round_to`` for the channel part.
        top_ups: how many ``"depth+width"`` candidates (the depth plan with its 1 .. ``top_ups`` most important
            gates kept).
        width: include the pure-width candidate.
        score: ``callable(candidate, model) -> float`` (lower is better), where ``model`` is the candidate built as
            it is trained (:meth:`build`); default: the one-shot proxy.
        tolerance: the channel ratio is bisected until the cost is within this fraction below the target.
        latency_repeats: timing rounds per measurement with ``cost="latency"`` (default 20).
        latency_device: the device latency is measured on (default: the example inputs' device).
        latency_channels_last: time the models in channels-last memory format.
        latency_cost: how latency is timed with ``cost="latency"``: runtime, batch size, threads, device, repeats
            (:class:`~resconv_plugin.LatencyCost`; default: eager PyTorch built from the three arguments above,
            which are then left out). The depth plan's lookup table is timed with it too, and every try of the
            channel bisection is built in the runtime once (an ONNX runtime: one export) however often it is timed.
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, reduction: float, *,
                 calibration_inputs: ExampleInputs, calibration_targets: Optional[torch.Tensor] = None,
                 cost: Cost = "latency", importance: Union[str, GateImportance] = "removal-bn",
                 channel_importance=None, round_to: Optional[int] = None, top_ups: int = 2, width: bool = True,
                 score: Optional[Callable[[PlanCandidate, nn.Module], float]] = None, tolerance: float = 0.02,
                 latency_repeats: Optional[int] = None, latency_device: Union[str, torch.device, None] = None,
                 latency_channels_last: bool = False, latency_cost: Optional[LatencyCost] = None) -> None:
        self.model = check_module(model)
        self.example_inputs = as_input_tuple(example_inputs)
        self.calibration_inputs = as_input_tuple(calibration_inputs)
        if calibration_targets is not None and not isinstance(calibration_targets, torch.Tensor):
            raise TypeError(f"calibration_targets must be a tensor of class indices, got "
                            f"{type(calibration_targets).__name__}")
        self.calibration_targets = calibration_targets
        check_number("reduction", reduction, Interval(0, 1, low_open=True, high_open=True))
        if isinstance(cost, LatencyCost):
            if latency_cost is not None and latency_cost is not cost:
                raise ValueError("cost is a LatencyCost and latency_cost is another: give one")
            cost, latency_cost = "latency", cost
        if not (cost in ("latency", "flops") or callable(cost)):
            raise ValueError(f"cost must be 'latency', 'flops', a LatencyCost or a callable(deployed_model) -> float, "
                             f"got {cost!r}")
        check_int("top_ups", top_ups)
        if score is not None and not callable(score):
            raise TypeError(f"score must be a callable(candidate, model) -> float, got {type(score).__name__}")
        if not gated_modules(model):
            raise ValueError(f"{type(model).__name__} has no gates: call resconv_plugin.convert(model, x) first")
        self.reduction, self.cost, self.importance = float(reduction), cost, importance
        self.channel_importance, self.round_to, self.top_ups, self.width = channel_importance, round_to, top_ups, width
        self.score_fn, self.tolerance = score, tolerance
        #: How latency is timed (runtime, batch size, threads, device, repeats).
        self.latency_cost = timing_cost(self.example_inputs, latency_cost, repeats=latency_repeats,
                                        channels_last=latency_channels_last, device=latency_device,
                                        prefix="latency_")
        self._base = deployed(model)
        self._grads: Optional[dict] = None  # the calibration batch's gradients (Taylor channel importance)
        self._references: Optional[tuple] = None  # the unpruned model's calibration outputs (one-shot score)
        self.last_search = None

    # ------------------------------------------------------------------------------------------------ costs
    def cost_rel(self, candidate: nn.Module) -> float:
        """The cost of ``candidate`` (any model; measured as deployed) relative to the deployed baseline's."""
        if callable(self.cost):
            return self.cost(deployed(candidate)) / self.cost(self._base)
        if self.cost == "flops":
            return (count_flops(deployed(candidate), self.example_inputs).total
                    / count_flops(self._base, self.example_inputs).total)
        # the candidate itself, not its deployed copy: the runtime builds it once for the repeated measurements of
        # a bisection's try (an ONNX runtime: one export), the baseline once for every candidate
        times = self.latency_cost.compare({"c": candidate, "b": self._base}, self.example_inputs)
        return times["c"] / times["b"]

    # ------------------------------------------------------------------------------------------------ building
    def build(self, depth_names: Sequence[str], channel_ratio: float) -> nn.Module:
        """A copy of the converted model with channels pruned at ``channel_ratio`` (global, this planner's channel
        importance and ``round_to``; gates kept): what the workflow trains for a candidate, fading
        ``depth_names`` out before removing them. The same ratio on the same weights gives the same structure."""
        import torch_pruning as tp

        from resconv_plugin.pruning.channels import channel_pruner

        pruned = copy.deepcopy(self.model).eval()
        if channel_ratio <= 0:
            return pruned
        importance = self.channel_importance or tp.importance.GroupTaylorImportance()
        if isinstance(importance, tp.importance.GroupTaylorImportance):
            self._load_gradients(pruned)
        kwargs = {"round_to": self.round_to} if self.round_to else {}
        channel_pruner(pruned, self.example_inputs, tp.pruner.MetaPruner, importance=importance,
                       pruning_ratio=channel_ratio, global_pruning=True, **kwargs).step()
        pruned.zero_grad(set_to_none=True)
        return pruned.eval()

    def _load_gradients(self, model: nn.Module) -> None:
        """The gradients of the calibration loss of the unpruned model, set on ``model``'s parameters (computed
        once: every candidate's channels are ranked by the same first-order importance)."""
        if self._grads is None:
            source = copy.deepcopy(self.model).eval()
            source.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = source(*self.calibration_inputs)
                labels = self.calibration_targets if self.calibration_targets is not None else out.argmax(-1)
                torch.nn.functional.cross_entropy(out, labels).backward()
            self._grads = {n: p.grad.detach().clone() for n, p in source.named_parameters() if p.grad is not None}
        for name, p in model.named_parameters():
            p.grad = self._grads[name].clone() if name in self._grads else None

    def structure(self, depth_names: Sequence[str], channel_ratio: float) -> nn.Module:
        """The candidate as deployed would be built: :meth:`build`, then ``depth_names`` removed."""
        model = self.build(depth_names, channel_ratio)
        remove_gates(model, depth_names)
        return model

    # ------------------------------------------------------------------------------------------------ depth
    def _probe(self):
        from resconv_plugin.pruning.pruner import LayerPruner

        kind = "latency" if self.cost == "latency" else "flops"
        return LayerPruner(copy.deepcopy(self.model), self.example_inputs, importance=self.importance,
                           **{f"{kind}_reduction": 0.0}, calibration_inputs=self.calibration_inputs,
                           calibration_targets=self.calibration_targets, latency_cost=self.latency_cost), kind

    def depth_plan(self) -> List[str]:
        """The depth recipe's gates for the whole budget (every gate when it cannot reach it), most important
        last."""
        probe, kind = self._probe()
        saved, total = probe.savings(kind)
        reachable = set_saving(saved, probe.gates) / total
        setattr(probe, f"{kind}_reduction", min(self.reduction, reachable * 0.999))
        measure, remembered = probe.scores, {}

        def scores(removed: Sequence[str] = ()) -> dict:  # the probe's model does not change: measured once
            key = tuple(sorted(removed))
            if key not in remembered:
                remembered[key] = measure(removed)
            return dict(remembered[key])

        probe.scores = scores
        chosen = probe.rank()
        scores = probe.scores()
        return sorted(chosen, key=lambda n: scores.get(n, 0.0))

    # ------------------------------------------------------------------------------------------------ planning
    def meet(self, depth_names: Sequence[str]) -> Optional[PlanCandidate]:
        """The candidate that removes ``depth_names`` and prunes channels until the budget is met (None when no
        ratio up to 0.95 meets it)."""
        target = 1.0 - self.reduction
        names = list(depth_names)
        alone = self.cost_rel(self.structure(names, 0.0))
        if alone <= target:
            return PlanCandidate("depth", names, 0.0, alone)
        search = bisect_ratio(lambda ratio: self.structure(names, ratio), self.cost_rel, target,
                              tolerance=self.tolerance, confirm=3 if self.cost == "latency" else 1)
        self.last_search = search
        if not search.met:
            return None
        kind = "width" if not names else "depth+width" if search.ratio > 0 else "depth"  # ratio 0: timed again, met
        return PlanCandidate(kind, names, search.ratio, search.cost_rel)

    def candidates(self) -> tuple:
        """``(candidates, unreachable)``: the measured candidates (unscored) and the kinds that missed."""
        depth = self.depth_plan()
        sets = [("depth", depth)] + [(f"depth+width {k}", depth[:-k]) for k in range(1, self.top_ups + 1)
                                     if 0 < k < len(depth)]
        if self.width:
            sets.append(("width", []))
        found, unreachable, seen = [], [], set()
        for label, names in sets:
            if tuple(sorted(names)) in seen:
                continue
            seen.add(tuple(sorted(names)))
            candidate = self.meet(names)
            if candidate is None:
                unreachable.append(label)
            else:
                found.append(candidate)
        return found, unreachable

    def _outputs(self, model: nn.Module) -> tuple:
        """Outputs on the calibration batch as the model is, and after re-estimating its BatchNorm statistics."""
        with eval_mode(model), torch.no_grad():
            raw = model(*self.calibration_inputs)
        model = copy.deepcopy(model)
        recalibrate_batchnorm(model, self.calibration_inputs)
        with eval_mode(model), torch.no_grad():
            return raw, model(*self.calibration_inputs)

    def oneshot_score(self, candidate: PlanCandidate, model: nn.Module) -> float:
        """The one-shot proxy of ``model`` (a :meth:`build`) with ``candidate``'s layers removed: the calibration
        loss (with ``calibration_targets``; else the divergence from the unpruned model's outputs), with the
        BatchNorm statistics as they are and re-estimated on the calibration batch (the unpruned reference treated
        the same way), the lower: re-estimation repairs what channel pruning shifts, an exact removal needs none."""
        model = copy.deepcopy(model)
        remove_gates(model, candidate.depth_names)
        if self._references is None:
            self._references = self._outputs(self.model)
        losses = [calibration_loss(out, self.calibration_targets) if self.calibration_targets is not None
                  else output_divergence(reference, out)
                  for reference, out in zip(self._references, self._outputs(model))]
        return min(losses)

    def plan(self) -> JointPlan:
        """Measure and score every candidate; the best is :attr:`JointPlan.best`.

        Raises:
            ValueError: no candidate reaches the budget.
        """
        found, unreachable = self.candidates()
        plan = JointPlan(target_rel=1.0 - self.reduction, unreachable=unreachable)
        if not found:
            raise ValueError(f"no candidate reaches {plan.target_rel:.3f} of the cost (the depth plan, with channel "
                             f"pruning up to ratio 0.95 on top: {unreachable})")
        score = self.score_fn or self.oneshot_score
        for candidate in found:
            candidate.score = float(score(candidate, self.build(candidate.depth_names, candidate.channel_ratio)))
        plan.candidates = found
        return plan


def remove_gates(model: nn.Module, names: Sequence[str]) -> None:
    """Set the gates ``names`` of ``model`` to 0 and remove them (exact: a gate at 0 is the identity), in place."""
    with torch.no_grad():
        gates = gated_modules(model)
        for name in names:
            gates[name].gamma.zero_()
    remove(model, list(names))
