"""The workflow rules, in one place: how sparsity steps are counted, what is removed after sparsity training, that
fine-tuning freezes the gates and comes before fusion. The pipeline (:func:`resconv_plugin.workflow.compress`), the
benchmarks and the examples all call these.

Example:
    >>> steps = sparsity_steps(data, epochs=3, batch_size=128)  # doctest: +SKIP
    >>> pruner = resconv_plugin.LayerPruner(model, x, flops_reduction=0.5, sparsity_steps=steps)  # doctest: +SKIP
    >>> train_stage(model, data, StageSettings("sparsity", 3, 0.02), pruner=pruner)  # doctest: +SKIP
    >>> pruned = remove_pruned(model, x, pruner)  # doctest: +SKIP
    >>> finetune(model, data, StageSettings("finetune", 3, 0.02))  # doctest: +SKIP
    >>> deployable = resconv_plugin.fuse(model.eval())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from torch import nn

from resconv_plugin._checks import check_int
from resconv_plugin._utils import ExampleInputs
from resconv_plugin.data import BatchLoader, ImageData
from resconv_plugin.fx.surgery import freeze_gates
from resconv_plugin.pruning.pruner import IgnoredLayers, LayerPruner, StepReport
from resconv_plugin.workflow.distributed import Dist
from resconv_plugin.workflow.training import StageProgress, StageSettings, train_stage

__all__ = ["sparsity_steps", "remove_pruned", "Pruned", "finetune"]


def sparsity_steps(data: ImageData, epochs: int, batch_size: int = 128) -> int:
    """The optimiser updates of ``epochs`` of sparsity training over ``data`` at global batch ``batch_size`` (at
    least 1): what ``LayerPruner(sparsity_steps=...)`` needs to anneal its budgeted set to exactly 0 in time. One
    update per full global batch (a last partial batch is dropped), the same under torchrun."""
    check_int("epochs", epochs, 0)
    check_int("batch_size", batch_size, 1)
    return max(1, epochs * len(BatchLoader(data, True, batch_size)))


@dataclass(frozen=True)
class Pruned:
    """What :func:`remove_pruned` took out: every removed gate's name, and the removal's report (the largest output
    change it caused on the calibration inputs, ...)."""

    removed: List[str]
    report: StepReport


def remove_pruned(model: nn.Module, example_inputs: ExampleInputs, pruner: Optional[LayerPruner] = None, *,
                  calibration_inputs: Optional[ExampleInputs] = None,
                  ignored_layers: Optional[IgnoredLayers] = None) -> Pruned:
    """Remove, in place, what pruning chose, and every other gate at exactly 0 (the identity: removing it is free
    and changes nothing).

    With ``pruner``: ``pruner.step()`` (after budget-driven sparsity training, the set it annealed to exactly 0;
    otherwise its budget or threshold applied now). Without: the gates at exactly 0 only, which after budget-driven
    sparsity training is the annealed set; no re-ranking of a model that training has changed.

    Args:
        model: the converted model (gates still in place).
        example_inputs: an example batch for tracing.
        pruner: the pruner of the sparsity training, or None.
        calibration_inputs: inputs the removal's output change is measured on (default: ``example_inputs``).
        ignored_layers: gates never removed (as for :class:`~resconv_plugin.LayerPruner`).
    """
    def zeros() -> LayerPruner:
        return LayerPruner(model, example_inputs, threshold=0.0, calibration_inputs=calibration_inputs,
                           ignored_layers=ignored_layers)

    first = pruner if pruner is not None else zeros()
    removed = list(first.step())
    if any(g == 0.0 for g in first.gates.values()):
        removed += zeros().step()
    return Pruned(removed=removed, report=first.last_step)


def finetune(model: nn.Module, data: ImageData, settings: StageSettings, dist: Optional[Dist] = None, *,
             teacher: Optional[nn.Module] = None, resume: Optional[dict] = None,
             on_epoch_end: Optional[Callable[[StageProgress], None]] = None) -> StageProgress:
    """Fine-tune a depth-pruned model, in place, before fusion: the gates are frozen first (no pruner keeps them in
    [0, 1] any more) and every remaining ResConv keeps its BatchNorm while it trains (fine-tuning a fused model, its
    BatchNorms folded away, lost 15 points of top-1 in a first benchmark). Fuse afterwards."""
    freeze_gates(model)
    return train_stage(model, data, settings, dist, teacher=teacher, resume=resume, on_epoch_end=on_epoch_end)
