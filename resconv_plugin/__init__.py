"""resconv_plugin: layer (depth) pruning for timm CNNs with fusible residual convolutions (ResConv).

Each eligible conv -> BatchNorm of a CNN becomes a :class:`ResConv`, ``gamma * bn(conv(x)) + (1 - gamma) * x``;
training with L1 on the gates drives unneeded layers to the identity, they are removed, and every remaining ResConv
fuses back into one plain conv.

The top level holds what a user's code calls (convert, the pruners and importance criteria, fuse / save / load /
export, FLOPs and latency, ``compress``); the parts live in the subpackages: :mod:`resconv_plugin.nn` (the gate
modules and their fusion maths), :mod:`resconv_plugin.fx` (conversion and removal), :mod:`resconv_plugin.pruning`,
:mod:`resconv_plugin.deploy`, :mod:`resconv_plugin.measure`, :mod:`resconv_plugin.workflow`. A name the top level
held before and no longer does still works for one release, with a ``FutureWarning`` that names its new place.

Example:
    >>> import timm, torch, resconv_plugin
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> report = resconv_plugin.convert(model, x)
    >>> fused = resconv_plugin.fuse(model.eval())
    >>> flops = resconv_plugin.count_flops(fused, x)
"""

from resconv_plugin._version import __version__


def _source_checkout_integrations() -> None:
    """Installed, setuptools maps ``resconv_plugin.integrations`` to the top-level ``integrations/`` folder. From a
    plain source checkout (``PYTHONPATH=.``) nothing does: register that folder under the same name, so the same
    imports work both ways. The core never imports it (host glue depends on the core, not the reverse)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = f"{__name__}.integrations"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "integrations"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["integrations"] = module  # what the import system does for a submodule it loads


_source_checkout_integrations()

from typing import TYPE_CHECKING

from resconv_plugin._deprecation import renamed_attributes
from resconv_plugin.nn import BlockGate, ResConv
from resconv_plugin.fx import ConversionReport, convert, freeze_gates, gated_modules
from resconv_plugin.deploy import deployed, export_onnx, fuse, load, save
from resconv_plugin.measure import (FlopReport, LatencyCost, count_flops, count_params, interleaved_latencies,
                                    median_latency)
from resconv_plugin.models import create_resconv_model
from resconv_plugin.pruning import (GateImportance, GateMagnitudeImportance, GateRemovalImportance,
                                    GateTaylorImportance, JointPlanner, LayerPruner)
from resconv_plugin import deploy, fx, measure, models, nn, pruning  # noqa: F401  (models registers the CIFAR
# networks with timm)

if TYPE_CHECKING:  # imported on first use (below): the workflow imports the core, not the reverse
    from resconv_plugin.workflow import compress

__all__ = [
    # convert a timm model: gates on its layers / residual blocks
    "convert", "create_resconv_model", "ResConv", "BlockGate", "ConversionReport", "gated_modules", "freeze_gates",
    # prune: the depth pruner, the depth + width planner, the gate importance criteria
    "LayerPruner", "JointPlanner", "GateImportance", "GateMagnitudeImportance", "GateRemovalImportance",
    "GateTaylorImportance",
    # deploy
    "fuse", "deployed", "save", "load", "export_onnx",
    # measure
    "count_flops", "FlopReport", "count_params", "LatencyCost", "median_latency", "interleaved_latencies",
    # the whole workflow (the resconv command)
    "compress",
    "__version__",
]

#: Names the top level had before this release, with where they live now: served with a FutureWarning.
_MOVED = {
    "identity_compatibility": ("resconv_plugin.nn", "identity_compatibility"),
    "ConvertedLayer": ("resconv_plugin.fx", "ConvertedLayer"),
    "SkippedConv": ("resconv_plugin.fx", "SkippedConv"),
    "Removal": ("resconv_plugin.fx", "Removal"),
    "fold_batchnorms": ("resconv_plugin.deploy", "fold_batchnorms"),
    "resconv_layers": ("resconv_plugin.deploy", "resconv_layers"),
    "onnx_session": ("resconv_plugin.deploy", "onnx_session"),
    "OnnxExport": ("resconv_plugin.deploy", "OnnxExport"),
    "read_recipe": ("resconv_plugin.deploy", "read_recipe"),
    "distillation_loss": ("resconv_plugin.distill", "distillation_loss"),
    "DistillationLoss": ("resconv_plugin.distill", "DistillationLoss"),
    "StepReport": ("resconv_plugin.pruning", "StepReport"),
    "recalibrate_batchnorm": ("resconv_plugin.pruning", "recalibrate_batchnorm"),
    "create_model": ("resconv_plugin", "create_resconv_model"),
    # the previous release's importance names (torch-pruning's class names, another call signature)
    "MagnitudeImportance": ("resconv_plugin", "GateMagnitudeImportance"),
    "RemovalImportance": ("resconv_plugin", "GateRemovalImportance"),
    "TaylorImportance": ("resconv_plugin", "GateTaylorImportance"),
}
_moved = renamed_attributes(__name__, _MOVED)


def __getattr__(name: str) -> object:
    """``compress`` on first use (it imports the workflow: timm's training pieces); the names moved to the
    subpackages, with a FutureWarning (PEP 562)."""
    if name == "compress":
        from resconv_plugin.workflow import compress

        globals()["compress"] = compress
        return compress
    return _moved(name)
