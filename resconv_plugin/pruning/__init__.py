"""Depth pruning: :class:`LayerPruner` and its parts, after torch-pruning's pruner / importance split.

* :mod:`~resconv_plugin.pruning.importance`: gate importance criteria (gates -> scores).
* :mod:`~resconv_plugin.pruning.cost`: what each removal saves (FLOPs, a measured latency table).
* :mod:`~resconv_plugin.pruning.select`: which gates meet a budget at least importance (pure functions), and
  :class:`~resconv_plugin.pruning.select.BudgetChooser`, one ranking asked for several goals.
* :mod:`~resconv_plugin.pruning.latency_fit`: a latency budget's goal, corrected by timing the chosen set.
* :mod:`~resconv_plugin.pruning.schedule`: the budget cap of budget-driven sparsity training.
* :mod:`~resconv_plugin.pruning.regularizer`: L1 on the gates (proximal or sub-gradient), after the optimizer's step.
* :mod:`~resconv_plugin.pruning.calibration`: measurements on a calibration batch, BatchNorm re-estimation.
* :mod:`~resconv_plugin.pruning.pruner`: :class:`LayerPruner`, composing them.
* :mod:`~resconv_plugin.pruning.channels`: torch-pruning's channel pruners set up for gated models.
* :mod:`~resconv_plugin.pruning.bisect`: :func:`bisect_ratio`, the one search of a channel ratio that meets a cost.
* :mod:`~resconv_plugin.pruning.planner`: :class:`JointPlanner`, one budget planned between depth (first) and
  width.

A new importance criterion is one :class:`GateImportance` subclass, passed as ``LayerPruner(importance=...)``.
"""

from resconv_plugin._deprecation import renamed_attributes
from resconv_plugin.pruning.bisect import RatioSearch, bisect_ratio
from resconv_plugin.pruning.calibration import calibration_loss, output_divergence, recalibrate_batchnorm
from resconv_plugin.pruning.cost import (flops_savings, latency_table, measured_saving, predicted_saving,
                                         removal_signatures)
from resconv_plugin.pruning.channels import channel_pruner, classifier_of
from resconv_plugin.pruning.importance import (
    _RENAMED, IMPORTANCES, FixedSetImportance, GateImportance, GateMagnitudeImportance, GateRemovalImportance,
    GateTaylorImportance, make_importance,
)
from resconv_plugin.pruning.latency_fit import fit_latency_goal
from resconv_plugin.pruning.planner import JointPlan, JointPlanner, PlanCandidate
from resconv_plugin.pruning.pruner import BUDGETS, LayerPruner, StepReport, given_budget
from resconv_plugin.pruning.regularizer import MODES, L1Regularizer
from resconv_plugin.pruning.schedule import CapSchedule
from resconv_plugin.pruning.select import (BudgetChooser, select_count, select_iteratively, select_within_budget,
                                           set_saving)

__all__ = [
    "LayerPruner", "StepReport", "BUDGETS", "given_budget",
    "GateImportance", "GateMagnitudeImportance", "GateRemovalImportance", "GateTaylorImportance",
    "IMPORTANCES", "make_importance", "flops_savings", "latency_table", "measured_saving", "predicted_saving",
    "removal_signatures",
    "select_within_budget", "select_iteratively", "select_count", "set_saving", "BudgetChooser", "fit_latency_goal",
    "CapSchedule", "L1Regularizer", "MODES",
    "output_divergence", "calibration_loss", "recalibrate_batchnorm", "FixedSetImportance", "JointPlanner", "JointPlan",
    "PlanCandidate", "channel_pruner", "classifier_of", "bisect_ratio", "RatioSearch",
]

# the previous release's importance names (torch-pruning's class names), with a FutureWarning
_renamed = renamed_attributes(__name__, {old: (__name__, new) for old, new in _RENAMED.items()})


def __getattr__(name: str):
    if name in ("JointPruner", "SplitCandidate"):
        raise AttributeError(
            f"{name}: JointPruner was replaced by JointPlanner (and SplitCandidate by PlanCandidate) in "
            "resconv_plugin.pruning.planner: a planner, not a pruner, whose candidates are the depth plan, the "
            "depth plan topped up with channels and pure width, trained at their final widths (plan(), build())")
    return _renamed(name)
