"""What removing each gate saves, on the model as deployed (gates fused, every conv -> BatchNorm folded).

One denominator everywhere: budgets, reports and benchmarks all count the deployed model (``deployed``).

* :func:`flops_savings`: fvcore FLOPs of the fused layer (or the whole fused block) plus the activation its removal
  also drops, minus an activation a removed block leaves behind.
* :func:`latency_table`: a lookup table measured on the deployed model in the runtime, at the batch size and with
  the threads of a :class:`~resconv_plugin.LatencyCost` (default: eager PyTorch at the given input's batch size and
  memory format): for each gate, the deployed model *with that gate removed* is timed against the full deployed model
  in turns, one pair at a time (median of ``repeats`` rounds); the saving is the difference. Unlike timing a layer
  alone, this sees what removal really changes in the whole forward pass (a dropped activation, memory traffic,
  kernel launches). Three corrections make the entries usable by a selection, which picks exactly the entries noise
  made large: (1) gates whose removals take out the same computation on the same shapes (:func:`removal_signatures`)
  get the median of their measurements (cifar_resnet56: 52 layers in 6 shapes, each ~1.5% of the batch-1 latency;
  single entries on a busy machine reached 0.43 of the latency, and a set chosen for 0.4 measured 0.02); (2) negative
  savings count as 0; (3) the model with *every* measured gate removed is timed too and the entries are scaled so that
  they sum to its saving (on a busy 2-core machine cifar_resnet20's 16 single entries summed to 0.26-0.46 of the
  latency at batch 1, removing all 16 measured 0.72); where no single removal measured a saving at all (tiny inputs,
  a loaded machine), that saving is shared equally. A set's predicted saving is the sum of its entries
  (:func:`predicted_saving`); ``benchmarks/ablation_depth.py`` reports how well that predicts the measured latency.
  Savings are not additive (cifar_resnet56: the 8-20 largest entries measured 0.7-0.8 of their sum): the pruner
  corrects the goal by measurement.
* :func:`measured_saving`: what removing a whole set saves, timed directly (the deployed model without the set
  against the full one, in turns). Per-gate entries are small next to timing noise on a busy machine (a layer of
  cifar_resnet20 is 2-5% of its latency at batch 1), so ``LayerPruner`` checks the set it chooses against this
  and corrects the table's goal until the measured saving meets the budget.
* :class:`GateCosts`: a pruner's tables of both kinds and the fit of its latency budget, measured once and kept
  (also in its state, so that every process and every resumption uses the same measurements), and the check that a
  budget is reachable.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from resconv_plugin._utils import as_input_tuple, eval_mode, run_example
from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.fx.graph import trace
from resconv_plugin.measure.latency_cost import LatencyCost
from resconv_plugin.fx.surgery import plan_removal, remove
from resconv_plugin.pruning.latency_fit import Choose, fit_latency_goal
from resconv_plugin.pruning.select import _short, set_saving

__all__ = ["flops_savings", "latency_table", "measured_saving", "predicted_saving", "removal_signatures", "COST_KINDS",
           "timing_cost", "GateCosts"]

COST_KINDS = ("flops", "latency")
_ALL = "\0every gate"  # the variant with every measured gate removed (not a module name)
Savings = Tuple[Dict[str, float], float]


def flops_savings(model: nn.Module, names: Iterable[str], example_inputs: Tuple[torch.Tensor, ...]) -> Savings:
    """``({name: FLOPs saved by removing it}, FLOPs of the deployed model)`` (fvcore, resconv_plugin's handles)."""
    graph = trace(model)
    plans = {name: plan_removal(model, name, graph) for name in names}
    report = count_flops(deployed(model), example_inputs)
    by = report.by_module
    saved = {}
    for name, plan in plans.items():
        n = by.get(name, 0)
        if plan.removed_activation and not plan.removed_activation.startswith(f"{name}."):
            n += by.get(plan.removed_activation, 0)  # a block's own activation is already in its count
        if plan.kept_activation:
            n -= by.get(plan.kept_activation, 0)
        saved[name] = float(n)
    return saved, float(report.total)


@torch.no_grad()
def latency_table(model: nn.Module, names: Iterable[str], example_inputs: Tuple[torch.Tensor, ...], *,
                  repeats: Optional[int] = None, channels_last: bool = False,
                  device: Union[str, torch.device, None] = None, pool_identical: bool = True,
                  cost: Optional[LatencyCost] = None) -> Savings:
    """``({name: seconds saved by removing it}, seconds of the deployed model)``, measured in turns on this machine.

    Args:
        model: the converted model (not changed).
        names: the gates to measure.
        example_inputs: the deployment input (its batch size is the one measured, unless ``cost`` sets one).
        repeats, channels_last, device: without ``cost``, time in eager PyTorch: ``repeats`` timing rounds
            (median; default 20), in ``torch.channels_last`` memory format or not, on ``device`` (the one you deploy to;
            default: the inputs' device; on CUDA every timed forward is synchronised).
        pool_identical: give the gates whose removals take out the same computation
            (:func:`removal_signatures`) the median of their measured savings.
        cost: the runtime, batch size, threads, device and repeats to time with (a
            :class:`~resconv_plugin.LatencyCost`; the other timing arguments must then be left out). The full
            model is built in the runtime once (an ONNX runtime: exported once), each removal once.

    Example:
        >>> table, seconds = latency_table(model, list(gated_modules(model)), (x[:1],),
        ...                                cost=LatencyCost("onnxruntime"))  # doctest: +SKIP
    """
    names = list(names)
    variants = {name: [name] for name in names}
    if len(names) > 1:
        variants[_ALL] = names
    cost = timing_cost(example_inputs, cost, repeats=repeats, channels_last=channels_last, device=device)
    times = _timed_removals(model, variants, example_inputs, cost=cost)
    full = times.pop("")
    every = times.pop(_ALL, None)
    single = {name: full - times[name] for name in names}
    if pool_identical:
        groups: Dict[tuple, list] = {}
        for name, signature in removal_signatures(model, names, example_inputs).items():
            groups.setdefault(signature, []).append(name)
        for members in groups.values():
            typical = statistics.median(single[n] for n in members)  # one removal timed in a slow spell: ignored
            single.update({n: typical for n in members})
    table = {name: max(0.0, v) for name, v in single.items()}
    summed = set_saving(table, names)
    if every is not None and full - every > 0:  # the sum of the entries = removing them all
        if summed > 0:
            table = {name: v * (full - every) / summed for name, v in table.items()}
        else:  # every single saving drowned in noise: share what removing them all measured
            outer = set_saving({name: 1.0 for name in names}, names)  # a layer inside a listed block not counted
            table = {name: (full - every) / outer for name in names}
    return table, full


@torch.no_grad()
def removal_signatures(model: nn.Module, names: Iterable[str],
                       example_inputs: Tuple[torch.Tensor, ...]) -> Dict[str, tuple]:
    """``{name: what removing it takes out}``: equal signatures = the same computation on the same shapes.

    A signature is the gate's module type, its parameters' shapes, the shapes it is called with and returns (one
    forward of ``example_inputs``), and the activation its removal also drops or leaves behind (its type). Removals
    with equal signatures cost the same time, so :func:`latency_table` pools their measurements: in a deep network
    with many identical layers (cifar_resnet56: 52 layers in 6 shapes) each entry then is the median of several
    measurements instead of one, which is what a set chosen from the table needs, since a selection favours the
    entries that noise made large.

    Example:
        >>> sigs = removal_signatures(model, ["layer1.0.conv1", "layer1.1.conv1"], (x,))  # doctest: +SKIP
        >>> sigs["layer1.0.conv1"] == sigs["layer1.1.conv1"]  # doctest: +SKIP
        True
    """
    names = list(names)
    modules = dict(model.named_modules())
    shapes: Dict[str, tuple] = {}

    def shape_of(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(shape_of(v) for v in value)
        return type(value).__name__

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            shapes.setdefault(name, (shape_of(args), shape_of(output)))
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with eval_mode(model):
            run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    graph = trace(model)
    signatures = {}
    for name in names:
        plan = plan_removal(model, name, graph)
        module = modules[name]
        activation = plan.removed_activation or plan.kept_activation
        signatures[name] = (type(module).__name__, plan.kind, plan.replaced_by,
                            tuple((k, tuple(p.shape)) for k, p in module.named_parameters()),
                            shapes.get(name), bool(plan.removed_activation), bool(plan.kept_activation),
                            type(modules[activation]).__name__ if activation else None)
    return signatures


@torch.no_grad()
def measured_saving(model: nn.Module, names: Iterable[str], example_inputs: Tuple[torch.Tensor, ...], *,
                    repeats: Optional[int] = None, channels_last: bool = False,
                    device: Union[str, torch.device, None] = None,
                    cost: Optional[LatencyCost] = None) -> Tuple[float, float]:
    """``(seconds saved by removing names together, seconds of the deployed model)``, both deployed models timed in
    turns on this machine (arguments as :func:`latency_table`; the saving may be negative within noise)."""
    cost = timing_cost(example_inputs, cost, repeats=repeats, channels_last=channels_last, device=device)
    times = _timed_removals(model, {"set": list(names)}, example_inputs, cost=cost, reuse=True)
    return times[""] - times["set"], times[""]


def timing_cost(example_inputs: Tuple[torch.Tensor, ...], cost: Optional[LatencyCost] = None, *,
                repeats: Optional[int] = None, channels_last: bool = False,
                device: Union[str, torch.device, None] = None, prefix: str = "") -> LatencyCost:
    """``cost``, or the eager-PyTorch :class:`~resconv_plugin.LatencyCost` of the older timing arguments (what the
    library timed before runtimes: the example input's own batch, ``repeats`` rounds, default 20, on ``device``,
    default the inputs' device). ``prefix``: of the caller's names of those arguments, for the error.

    Raises:
        ValueError: ``cost`` given together with ``repeats``, ``channels_last`` or ``device`` that differ from it.
    """
    if cost is None:
        device = device if device is not None else as_input_tuple(example_inputs)[0].device
        return LatencyCost("eager", batch_size=None, repeats=20 if repeats is None else repeats,
                           channels_last=channels_last, device=device)
    if not isinstance(cost, LatencyCost):
        raise TypeError(f"latency_cost must be a resconv_plugin.LatencyCost, got {type(cost).__name__}")
    clashes = [prefix + name for name, clash in (("repeats", repeats is not None and repeats != cost.repeats),
                                        ("channels_last", channels_last and not cost.channels_last),
                                        ("device", device is not None and torch.device(device) != cost.device))
               if clash]
    if clashes:
        raise ValueError(f"{', '.join(clashes)} and a LatencyCost ({cost.describe()}) both say how to time: set "
                         f"{'it' if len(clashes) == 1 else 'them'} on the LatencyCost")
    return cost


def _timed_removals(model: nn.Module, variants: Dict[str, list], example_inputs: Tuple[torch.Tensor, ...], *,
                    cost: LatencyCost, reuse: bool = False) -> Dict[str, float]:
    """Median seconds of the deployed model (key ``""``) and of each variant (the model with its gates removed).

    Each variant is timed in turns with the deployed model, one pair at a time (the state of the caches of a
    deployment that runs one model; dozens of models in turns are each timed with their weights evicted by the
    others), and reported as the deployed model's median seconds minus the pair's own difference. ``cost`` builds
    the full model in its runtime once for all the pairs; ``reuse``: a variant timed before (the same gates of the
    same, unchanged model: a set measured again) is built once too (:meth:`~resconv_plugin.LatencyCost.derived`).
    """
    fulls, savings = [], {}
    for key, removed in variants.items():
        def without(removed: list = removed) -> nn.Module:
            variant = copy.deepcopy(model)
            remove(variant, removed)
            return variant

        variant = cost.derived(model, ("without", tuple(sorted(removed))), without) if reuse else without()
        times = cost.compare({"": model, "v": variant}, example_inputs)
        fulls.append(times[""])
        savings[key] = times[""] - times["v"]
    seconds = statistics.median(fulls) if fulls else cost(model, example_inputs)
    return {"": seconds, **{key: seconds - saved for key, saved in savings.items()}}


def predicted_saving(savings: Dict[str, float], names: Iterable[str]) -> float:
    """The table's prediction for removing ``names`` together: the sum of their entries (a layer inside a block
    in ``names`` goes with the block and is not counted twice; :func:`~resconv_plugin.pruning.set_saving`)."""
    return set_saving(savings, names)


class GateCosts:
    """What removing each gate of a pruner's model saves, in FLOPs or seconds of the deployed model, and the measured
    correction of a latency budget's goal (:attr:`fit`): each is measured at its first use and kept (in the state too:
    every process and every resumption of a run uses the same measurements). A pruner builds a new one whenever its
    model's structure changes.

    Args:
        model: the gated model (not changed).
        example_inputs: the deployment input.
        latency_cost: how latency is timed (:func:`timing_cost`).

    Example:
        >>> costs = GateCosts(model, (x[:1],), timing_cost((x[:1],)))  # doctest: +SKIP
        >>> saved, total = costs.savings("flops", ["layer1.0.conv1"])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, example_inputs: Tuple[torch.Tensor, ...], latency_cost: LatencyCost) -> None:
        self.model, self.example_inputs, self.latency_cost = model, example_inputs, latency_cost
        #: ``{kind: (savings, total)}``, the tables measured (or loaded) so far.
        self.tables: Dict[str, Savings] = {}
        #: The latency fit (:func:`~resconv_plugin.pruning.latency_fit.fit_latency_goal`), None before one is made.
        self.fit: Optional[Dict[str, Any]] = None

    def savings(self, kind: str, names: Sequence[str]) -> Savings:
        """``({name: what removing it saves}, total)`` in FLOPs (:func:`flops_savings`) or seconds
        (:func:`latency_table`) for the gates ``names``; measured on the first call of each kind, then kept.

        Raises:
            ValueError: ``kind`` is not ``"flops"`` or ``"latency"``.
        """
        if kind not in COST_KINDS:
            raise ValueError(f"kind must be 'flops' or 'latency', got {kind!r}")
        if kind not in self.tables:
            if kind == "flops":
                self.tables[kind] = flops_savings(self.model, list(names), self.example_inputs)
            else:
                self.tables[kind] = latency_table(self.model, list(names), self.example_inputs, cost=self.latency_cost)
        return self.tables[kind]

    def measured(self, chosen: List[str]) -> float:
        """The measured latency saving of removing ``chosen`` together, as a fraction of the deployed model's."""
        seconds, full = measured_saving(self.model, chosen, self.example_inputs, cost=self.latency_cost)
        return seconds / full

    def latency_goal(self, choose: Choose, fraction: float, names: List[str]) -> Tuple[float, int]:
        """``(goal, extra)`` whose set ``choose(goal, extra)`` meets ``fraction`` of the latency as measured
        (:func:`~resconv_plugin.pruning.latency_fit.fit_latency_goal`); the fit is kept in :attr:`fit` and reused."""
        saved, total = self.savings("latency", names)
        goal, extra, self.fit = fit_latency_goal(choose, self.measured, saved, total, fraction, self.fit, names=names)
        if self.fit is not None:  # the fit holds for the runtime it timed in
            self.fit.setdefault("latency", self.latency_cost.as_dict())
        return goal, extra

    def check_reachable(self, kind: str, fraction: float, names: List[str]) -> None:
        """Raise a ValueError when removing every gate of ``names`` saves less than ``fraction`` of the total
        (``kind``: ``"flops"`` or ``"latency"``). A latency table is scaled to one timing of removing every gate: one
        disturbed timing must not refuse the budget (on a busy machine cifar_resnet20's 7 blocks read 0.47 of its
        latency, where 6 of them measured 0.63 in another run): the median of three more (:meth:`measured`) decides.
        """
        saved, total = self.savings(kind, names)
        target = fraction * total
        reachable = set_saving(saved, names)
        if _short(reachable, target) and kind == "latency":
            whole = statistics.median(self.measured(names) for _ in range(3))
            if whole >= fraction:
                return
            reachable = whole * total
        if _short(reachable, target):  # the selection's own test: a goal at the maximum is reachable
            raise ValueError(f"{kind}_reduction={target / total:.3g} is unreachable: removing every prunable gate "
                             f"({len(names)}) removes at most {reachable / total:.3f} of the model's "
                             f"{'FLOPs' if kind == 'flops' else 'latency'}")

    def state_dict(self) -> Dict[str, Any]:
        """The tables, the runtime and batch size of a latency table (a table timed elsewhere is another budget), the
        latency fit."""
        return {"costs": {k: (dict(v[0]), v[1]) for k, v in self.tables.items()},
                "latency": self.latency_cost.as_dict() if "latency" in self.tables else None, "latency_fit": self.fit}

    def check_state(self, state: Dict[str, Any]) -> None:
        """Raise a ValueError when ``state``'s latency table was timed in another runtime or at another batch size."""
        timed, own = state.get("latency") or {}, self.latency_cost.as_dict()
        differ = [k for k in ("runtime", "batch_size") if k in timed and timed[k] != own[k]]
        if differ:  # a table timed elsewhere is another budget
            raise ValueError(f"the saved latency table was timed with {', '.join(f'{k} {timed[k]!r}' for k in differ)}"
                             f"; this pruner times with {', '.join(f'{k} {own[k]!r}' for k in differ)}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take the tables and the fit of ``state`` (:meth:`state_dict`, or a pruner's state holding it) instead of
        measuring them."""
        self.tables = {k: (dict(v[0]), float(v[1])) for k, v in (state.get("costs") or {}).items()}
        self.fit = state.get("latency_fit")
