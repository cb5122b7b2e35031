"""What removing each gate saves, on the model as deployed (gates fused, every conv -> BatchNorm folded).

One denominator everywhere: budgets, reports and benchmarks all count the deployed model (``deployed``).

* :func:`flops_savings`: fvcore FLOPs of the fused layer (or the whole fused block) plus the activation its removal
  also drops, minus an activation a removed block leaves behind.
* :func:`latency_table`: a lookup table measured on the deployed model at the given input (its batch size) and
  memory format: for each gate, the deployed model *with that gate removed* is timed against the full deployed model,
  all of them in turns (median of ``repeats`` rounds); the saving is the difference (0 where noise makes it
  negative). Unlike timing a layer alone, this sees what removal really changes in the whole forward pass (a
  dropped activation, memory traffic, kernel launches). The model with *every* measured gate removed is timed in
  the same rounds and the entries are scaled so that they sum to its saving: single savings of a few percent are
  biased by noise (on a busy 2-core machine the sum of cifar_resnet20's 16 entries came to 0.26-0.46 of the latency
  at batch 1, while removing all 16 measured 0.72), the saving of removing them all is not; where no single removal
  measured a saving at all (tiny inputs, a loaded machine), that saving is shared equally. A set's predicted
  saving is the sum of its entries (:func:`predicted_saving`); ``benchmarks/ablation_depth.py`` reports how well that
  predicts the measured latency.
* :func:`measured_saving`: what removing a whole set saves, timed directly (the deployed model without the set
  against the full one, in turns). Per-gate entries are small next to timing noise on a busy machine (a layer of
  cifar_resnet20 is 2-5% of its latency at batch 1), so ``LayerPruner`` checks the set it chooses against this
  and corrects the table's goal until the measured saving meets the budget.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, Tuple, Union

import torch
from torch import nn

from resconv_plugin.deploy.fold import deployed
from resconv_plugin.measure.flops import count_flops
from resconv_plugin.fx.graph import trace
from resconv_plugin.measure.latency import interleaved_latencies
from resconv_plugin.fx.surgery import plan_removal, remove
from resconv_plugin.pruning.select import set_saving

__all__ = ["flops_savings", "latency_table", "measured_saving", "predicted_saving", "COST_KINDS"]

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
        if plan.removed_activation:
            n += by.get(plan.removed_activation, 0)
        if plan.kept_activation:
            n -= by.get(plan.kept_activation, 0)
        saved[name] = float(n)
    return saved, float(report.total)


@torch.no_grad()
def latency_table(model: nn.Module, names: Iterable[str], example_inputs: Tuple[torch.Tensor, ...], *,
                  repeats: int = 20, channels_last: bool = False,
                  device: Union[str, torch.device, None] = None) -> Savings:
    """``({name: seconds saved by removing it}, seconds of the deployed model)``, measured in turns on this machine.

    Args:
        model: the converted model (not changed).
        names: the gates to measure.
        example_inputs: the deployment input (its batch size is the one measured).
        repeats: timing rounds (median).
        channels_last: time the models and inputs in ``torch.channels_last`` memory format.
        device: the device to time on (the one you deploy to; default: the inputs' device). On CUDA every timed
            forward is synchronised.
    """
    names = list(names)
    variants = {name: [name] for name in names}
    if len(names) > 1:
        variants[_ALL] = names
    times = _timed_removals(model, variants, example_inputs, repeats=repeats, channels_last=channels_last,
                            device=device)
    full = times.pop("")
    every = times.pop(_ALL, None)
    table = {name: max(0.0, full - t) for name, t in times.items()}
    summed = set_saving(table, names)
    if every is not None and full - every > 0:  # the sum of the entries = removing them all
        if summed > 0:
            table = {name: v * (full - every) / summed for name, v in table.items()}
        else:  # every single saving drowned in noise: share what removing them all measured
            outer = set_saving({name: 1.0 for name in names}, names)  # a layer inside a listed block not counted
            table = {name: (full - every) / outer for name in names}
    return table, full


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
    """Median seconds of the deployed model (key ``""``) and of each variant (the model with its gates removed),
    timed in turns."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    device = torch.device(device) if device is not None else example_inputs[0].device
    inputs = tuple((t.contiguous(memory_format=fmt) if t.dim() == 4 else t).to(device) for t in example_inputs)
    models = {"": deployed(model).to(device, memory_format=fmt)}
    for key, removed in variants.items():
        variant = copy.deepcopy(model)
        remove(variant, removed)
        models[key] = deployed(variant).to(device, memory_format=fmt)
    return interleaved_latencies({k: (lambda m=m: m(*inputs)) for k, m in models.items()}, repeats=repeats)


def predicted_saving(savings: Dict[str, float], names: Iterable[str]) -> float:
    """The table's prediction for removing ``names`` together: the sum of their entries (a layer inside a block
    in ``names`` goes with the block and is not counted twice; :func:`~resconv_plugin.pruning.set_saving`)."""
    return set_saving(savings, names)
