"""Gate importance criteria: gates -> scores (higher = more important to keep), after ``torch_pruning.importance``.

Each criterion is a small callable class; :class:`~resconv_plugin.LayerPruner` takes one (or its name) as
``importance=``. A new criterion is a subclass of :class:`GateImportance` with ``__call__`` (and, if it learns from
training, ``observe``). They score *gates* (``importance(model, gates, ...) -> {name: score}``), not torch-pruning's
channel groups, hence their own names (``Gate...``): a ``torch_pruning.importance`` object is refused with a
``TypeError``. The names of the previous release (``MagnitudeImportance``, ``RemovalImportance``,
``TaylorImportance``, which read like torch-pruning's) still work for one release, with a ``FutureWarning``.

* :class:`GateMagnitudeImportance` (``"magnitude"``): ``|gamma|``, the paper's criterion. It knows nothing before
  sparsity training has separated the gates (all start at 1).
* :class:`GateRemovalImportance` (``"removal"``): what setting the gate to 0 does on the calibration batch: the increase
  of the task loss when ``calibration_targets`` are given, else the label-free KL divergence of the softmax from the
  unpruned model's outputs (mean squared difference for outputs that are not logits). ``iterative=True``
  re-measures after each chosen gate (the pruner then selects greedily, seeing interactions between removals).
* :class:`GateTaylorImportance` (``"taylor"``): the first-order estimate ``|gamma * dL/dgamma|`` of the loss change when
  the gate goes to 0, averaged over the training steps seen by :meth:`~GateTaylorImportance.observe` (free: the
  gradients are there after ``loss.backward()``); before any step, one backward pass on the calibration batch (with
  its targets, else the model's own predictions as labels).

Example:
    >>> import timm, torch, resconv_plugin
    >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
    >>> x = torch.randn(8, 1, 28, 28)
    >>> _ = resconv_plugin.convert(model, x)
    >>> gates = resconv_plugin.gated_modules(model)
    >>> scores = GateRemovalImportance()(model, gates, inputs=(x,))
    >>> len(scores) == len(gates)
    True
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from resconv_plugin._deprecation import renamed_attributes
from resconv_plugin._utils import eval_mode
from resconv_plugin.pruning.calibration import (
    batchnorm_statistics_kept, calibration_loss, output_divergence, recalibrate_batchnorm,
)

__all__ = ["GateImportance", "GateMagnitudeImportance", "GateRemovalImportance", "GateTaylorImportance",
           "FixedSetImportance", "IMPORTANCES", "make_importance"]

Gates = Mapping[str, nn.Module]
Inputs = Optional[Tuple[torch.Tensor, ...]]


class GateImportance:
    """Base class of gate importance criteria.

    Attributes:
        iterative: the criterion wants to be re-measured after each chosen gate (``removed=`` then names them).
        needs_inputs: the criterion measures the model on the calibration inputs.
    """

    iterative: bool = False
    needs_inputs: bool = False
    name: str = "custom"

    def __call__(self, model: nn.Module, gates: Gates, *, inputs: Inputs = None,
                 targets: Optional[torch.Tensor] = None, removed: Sequence[str] = ()) -> Dict[str, float]:
        """``{name: score}`` for every gate in ``gates`` (those in ``removed`` are taken as already at 0)."""
        raise NotImplementedError

    def observe(self, gates: Gates) -> None:
        """Called by the pruner after each ``loss.backward()`` of sparsity training (gradients available)."""

    def reset(self) -> None:
        """Forget what :meth:`observe` accumulated (called after each selection)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GateMagnitudeImportance(GateImportance):
    """``|gamma|`` (the paper's criterion).

    Example:
        >>> from resconv_plugin import BlockGate
        >>> GateMagnitudeImportance()(None, {"b": BlockGate(torch.nn.BatchNorm2d(2), init_gamma=0.5)})
        {'b': 0.5}
    """

    name = "magnitude"

    def __call__(self, model, gates, *, inputs=None, targets=None, removed=()):
        return {n: abs(g.gamma.item()) for n, g in gates.items()}


@contextlib.contextmanager
def gates_at_zero(gates: Gates, names: Sequence[str]) -> Iterator[None]:
    """Set the named gates to exactly 0 for the block (what their removal computes), then restore them."""
    saved = [(gates[n].gamma, gates[n].gamma.detach().clone()) for n in names]
    try:
        with torch.no_grad():
            for gamma, _ in saved:
                gamma.zero_()
        yield
    finally:
        with torch.no_grad():
            for gamma, value in saved:
                gamma.copy_(value)


def _inside_any(name: str, blocks: Sequence[str]) -> bool:
    return any(name.startswith(f"{b}.") for b in blocks)


class GateRemovalImportance(GateImportance):
    """The measured effect of setting each gate to 0 on the calibration batch (eval mode).

    With ``targets``: the increase of the cross-entropy loss. Without: ``KL(softmax(unpruned) || softmax(pruned))``
    minus the same for the current removals (mean squared difference of the outputs for non-classifier outputs).
    A gate whose removal changes nothing scores 0.

    Args:
        iterative: ask the pruner to re-measure after each chosen gate (greedy selection with re-measurement).
        recalibrate: measure each variant (and the reference) with its BatchNorm statistics re-estimated on the
            calibration batch, as fine-tuning would leave them (the model's own statistics are restored after). The
            raw change mostly measures the statistics' shift: removing cifar_resnet20's first block raised the loss
            by 2.31 nats raw and by 0.08 re-estimated, less than either block of its last stage (0.21, 0.31), which
            fine-tuning cannot restore as easily.
    """

    needs_inputs = True
    name = "removal"

    def __init__(self, iterative: bool = False, recalibrate: bool = False) -> None:
        for arg, value in (("iterative", iterative), ("recalibrate", recalibrate)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool, got {type(value).__name__}")
        self.iterative, self.recalibrate = iterative, recalibrate

    @torch.no_grad()
    def __call__(self, model, gates, *, inputs=None, targets=None, removed=()):
        if not inputs:
            raise ValueError("GateRemovalImportance measures the model: pass calibration_inputs (a batch of real "
                             "inputs) to the LayerPruner")
        removed = [n for n in removed if n in gates]
        with eval_mode(model):
            reference = None if targets is not None else model(*inputs)

            def measure() -> float:
                with batchnorm_statistics_kept(model) if self.recalibrate else contextlib.nullcontext():
                    if self.recalibrate:
                        recalibrate_batchnorm(model, inputs)
                    out = model(*inputs)
                return calibration_loss(out, targets) if targets is not None else output_divergence(reference, out)

            with gates_at_zero(gates, removed):
                base = measure()
                scores = {}
                for name in gates:
                    if name in removed or _inside_any(name, removed):
                        scores[name] = 0.0
                        continue
                    with gates_at_zero(gates, [name]):
                        scores[name] = measure() - base
        return scores

    def __repr__(self) -> str:
        return f"GateRemovalImportance(iterative={self.iterative}, recalibrate={self.recalibrate})"


class GateTaylorImportance(GateImportance):
    """First-order Taylor estimate of the loss change when a gate goes to 0: ``|gamma * dL/dgamma|``.

    Averaged over the ``observe()`` calls since the last :meth:`reset` (the pruner calls ``observe`` in every
    ``regularize()``); with none yet, one backward pass on the calibration batch (cross-entropy with
    ``targets``, else with the model's own predicted classes).
    """

    name = "taylor"

    def __init__(self) -> None:
        self._sums: Dict[str, float] = {}
        self._count = 0

    def observe(self, gates: Gates) -> None:
        """Add this step's ``|gamma * dL/dgamma|``. A step with a gradient that is not finite is left out: with
        fp16 loss scaling an overflow step has inf / NaN gradients (after ``unscale_``), and the scaler skips that
        step too."""
        named = [(name, gate.gamma) for name, gate in gates.items() if gate.gamma.grad is not None]
        if named:
            with torch.no_grad():  # one device-to-host copy per step, not one per gate
                values = torch.stack([(g * g.grad).abs().float().reshape(()) for _, g in named]).tolist()
            if not all(math.isfinite(v) for v in values):
                return
            for (name, _), value in zip(named, values):
                self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1

    def reset(self) -> None:
        self._sums, self._count = {}, 0

    def __call__(self, model, gates, *, inputs=None, targets=None, removed=()):
        if self._count:
            return {n: self._sums.get(n, 0.0) / self._count for n in gates}
        if not inputs:
            raise ValueError("GateTaylorImportance has seen no training step yet: pass calibration_inputs to the "
                             "LayerPruner (or call regularize() during training first)")
        gammas = [g.gamma for g in gates.values()]
        with eval_mode(model), torch.enable_grad():
            out = model(*inputs)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            labels = targets if targets is not None else logits.detach().argmax(1)
            loss = F.cross_entropy(logits, labels.to(logits.device))
            grads = torch.autograd.grad(loss, gammas, allow_unused=True)
        return {n: 0.0 if grad is None else (g.gamma.detach() * grad).abs().item()
                for (n, g), grad in zip(gates.items(), grads)}

    def state_dict(self) -> dict:
        return {"sums": dict(self._sums), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._sums, self._count = dict(state.get("sums", {})), int(state.get("count", 0))


class FixedSetImportance(GateImportance):
    """The gates you name score 0 (they go first), every other gate 1: budget selection then takes the named set
    (when it meets the budget; ties among the rest go to the larger saving). For training a set chosen elsewhere,
    e.g. ``JointPlanner``'s plan.

    Args:
        names: the gates to remove.
    """

    name = "fixed"

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a sequence of gate names, got {names!r}")
        self.names = list(names)

    def __call__(self, model, gates, *, inputs=None, targets=None, removed=()):
        missing = [n for n in self.names if n not in gates]
        if missing:
            raise ValueError(f"FixedSetImportance names gates the pruner does not have: {missing[:5]}")
        return {n: 0.0 if n in self.names else 1.0 for n in gates}

    def __repr__(self) -> str:
        return f"FixedSetImportance({self.names!r})"


#: Criterion names accepted by ``LayerPruner(importance=...)``.
IMPORTANCES = {"magnitude": GateMagnitudeImportance, "removal": GateRemovalImportance,
               "taylor": GateTaylorImportance}
#: The previous release's class names (torch-pruning's, with another call signature), served with a warning.
_RENAMED = {"MagnitudeImportance": "GateMagnitudeImportance", "RemovalImportance": "GateRemovalImportance",
           "TaylorImportance": "GateTaylorImportance"}
__getattr__ = renamed_attributes(__name__, {old: (__name__, new) for old, new in _RENAMED.items()})


def _from_torch_pruning(importance: object) -> bool:
    """Whether ``importance`` is a torch-pruning importance (checked by its classes' module: no import of it)."""
    return any(cls.__module__.split(".")[0] == "torch_pruning" for cls in type(importance).__mro__)


#: Names of configured criteria, accepted as well.
VARIANTS = {"removal-iterative": lambda: GateRemovalImportance(iterative=True),
            "removal-bn": lambda: GateRemovalImportance(recalibrate=True)}


def make_importance(importance: Union[str, GateImportance]) -> GateImportance:
    """The criterion for a name in :data:`IMPORTANCES` or :data:`VARIANTS`, or a :class:`GateImportance`.

    Raises:
        ValueError: an unknown name.
        TypeError: anything else, e.g. a ``torch_pruning.importance`` object (it scores channel groups, not gates).

    Example:
        >>> make_importance("removal-iterative")
        GateRemovalImportance(iterative=True, recalibrate=False)
    """
    if isinstance(importance, GateImportance):
        return importance
    names = sorted(IMPORTANCES) + list(VARIANTS)
    if isinstance(importance, str) and importance in VARIANTS:
        return VARIANTS[importance]()
    if isinstance(importance, str) and importance in IMPORTANCES:
        return IMPORTANCES[importance]()
    if isinstance(importance, str):
        raise ValueError(f"importance must be one of {names} or a GateImportance instance, got {importance!r}")
    if _from_torch_pruning(importance):
        raise TypeError(f"importance={type(importance).__name__}(...) is a torch-pruning importance: it scores "
                        f"channel groups, LayerPruner scores gates. Pass a name ({', '.join(map(repr, names))}) or "
                        "a resconv_plugin.pruning.GateImportance such as GateMagnitudeImportance(), "
                        "GateTaylorImportance() or GateRemovalImportance() (torch-pruning's importances stay with "
                        "torch-pruning's pruners, e.g. channel_pruner(..., importance=...))")
    raise TypeError(f"importance must be one of {names} or a GateImportance instance, got "
                    f"{type(importance).__name__}")
