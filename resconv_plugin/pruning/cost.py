"""What removing each gate saves, on the model as deployed (gates fused, every conv -> BatchNorm folded).

One denominator everywhere: budgets, reports and benchmarks all count the deployed model (``deployed``).

* :func:`flops_savings`: fvcore FLOPs of the fused layer (or the whole fused block) plus the activation its removal
  also drops, minus an activation a removed block leaves behind.
* :func:`latency_table`: a lookup table measured on the deployed model at the given input (its batch size) and
  memory format: for each gate, the deployed model *with that gate removed* is timed against the full deployed model
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
"""

from __future__ import annotations

import copy
import statistics
from typing import Dict, Iterable, Tuple, Union

import torch
from torch import nn

from resconv_plugin._utils import eval_mode, run_example
from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.fx.graph import trace
from resconv_plugin.measure.latency import interleaved_latencies, median_latency
from resconv_plugin.fx.surgery import plan_removal, remove
from resconv_plugin.pruning.select import set_saving

__all__ = ["flops_savings", "latency_table", "measured_saving", "predicted_saving", "removal_signatures", "COST_KINDS"]

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
                  repeats: int = 20, channels_last: bool = False,
                  device: Union[str, torch.device, None] = None, pool_identical: bool = True) -> Savings:
    """``({name: seconds saved by removing it}, seconds of the deployed model)``, measured in turns on this machine.

    Args:
        model: the converted model (not changed).
        names: the gates to measure.
        example_inputs: the deployment input (its batch size is the one measured).
        repeats: timing rounds (median).
        channels_last: time the models and inputs in ``torch.channels_last`` memory format.
        device: the device to time on (the one you deploy to; default: the inputs' device). On CUDA every timed
            forward is synchronised.
        pool_identical: give the gates whose removals take out the same computation
            (:func:`removal_signatures`) the median of their measured savings.

    Example:
        >>> table, seconds = latency_table(model, list(gated_modules(model)), (x[:1],))  # doctest: +SKIP
    """
    names = list(names)
    variants = {name: [name] for name in names}
    if len(names) > 1:
        variants[_ALL] = names
    times = _timed_removals(model, variants, example_inputs, repeats=repeats, channels_last=channels_last,
                            device=device)
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
                    repeats: int = 20, channels_last: bool = False,
                    device: Union[str, torch.device, None] = None) -> Tuple[float, float]:
    """``(seconds saved by removing names together, seconds of the deployed model)``, both deployed models timed in
    turns on this machine (arguments as :func:`latency_table`; the saving may be negative within noise)."""
    times = _timed_removals(model, {"set": list(names)}, example_inputs, repeats=repeats,
                            channels_last=channels_last, device=device)
    return times[""] - times["set"], times[""]


def _timed_removals(model: nn.Module, variants: Dict[str, list], example_inputs: Tuple[torch.Tensor, ...], *,
                    repeats: int, channels_last: bool, device) -> Dict[str, float]:
    """Median seconds of the deployed model (key ``""``) and of each variant (the model with its gates removed).

    Each variant is timed in turns with the deployed model, one pair at a time (the state of the caches of a
    deployment that runs one model; dozens of models in turns are each timed with their weights evicted by the
    others), and reported as the deployed model's median seconds minus the pair's own difference.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    device = torch.device(device) if device is not None else example_inputs[0].device
    inputs = tuple((t.contiguous(memory_format=fmt) if t.dim() == 4 else t).to(device) for t in example_inputs)
    full = deployed(model).to(device, memory_format=fmt)
    fulls, savings = [], {}
    for key, removed in variants.items():
        variant = copy.deepcopy(model)
        remove(variant, removed)
        plain = deployed(variant).to(device, memory_format=fmt)
        times = interleaved_latencies({"": lambda: full(*inputs), "v": lambda: plain(*inputs)}, repeats=repeats,
                                      device=device)
        fulls.append(times[""])
        savings[key] = times[""] - times["v"]
    seconds = statistics.median(fulls) if fulls else median_latency(lambda: full(*inputs), repeats=repeats,
                                                                    device=device)
    return {"": seconds, **{key: seconds - saved for key, saved in savings.items()}}


def predicted_saving(savings: Dict[str, float], names: Iterable[str]) -> float:
    """The table's prediction for removing ``names`` together: the sum of their entries (a layer inside a block
    in ``names`` goes with the block and is not counted twice; :func:`~resconv_plugin.pruning.set_saving`)."""
    return set_saving(savings, names)
