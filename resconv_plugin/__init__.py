"""resconv_plugin: layer (depth) pruning for timm CNNs with fusible residual convolutions (ResConv).

Each eligible conv -> BatchNorm of a CNN becomes a :class:`ResConv`, ``gamma * bn(conv(x)) + (1 - gamma) * x``;
training with L1 on the gates drives unneeded layers to the identity, they are removed, and every remaining ResConv
fuses back into one plain conv.

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

from resconv_plugin.nn import BlockGate, ResConv, identity_compatibility
from resconv_plugin.fx import (
    ConversionReport, ConvertedLayer, Removal, SkippedConv, convert, freeze_gates, gated_modules,
)
from resconv_plugin.deploy import (
    OnnxExport, deployed, export_onnx, fold_batchnorms, fuse, load, onnx_session, read_recipe, resconv_layers, save,
)
from resconv_plugin.measure import FlopReport, count_flops, count_params, interleaved_latencies, median_latency
from resconv_plugin.models import create_model
from resconv_plugin.distill import DistillationLoss, distillation_loss
from resconv_plugin.pruning import LayerPruner, StepReport, recalibrate_batchnorm
from resconv_plugin import deploy, fx, measure, models, nn, pruning  # noqa: F401  (models registers the CIFAR
# networks with timm)

__all__ = [
    "ResConv",
    "BlockGate",
    "convert",
    "create_model",
    "ConversionReport",
    "ConvertedLayer",
    "SkippedConv",
    "fuse",
    "fold_batchnorms",
    "deployed",
    "resconv_layers",
    "count_flops",
    "count_params",
    "FlopReport",
    "identity_compatibility",
    "LayerPruner",
    "StepReport",
    "Removal",
    "gated_modules",
    "freeze_gates",
    "recalibrate_batchnorm",
    "distillation_loss",
    "DistillationLoss",
    "interleaved_latencies",
    "median_latency",
    "export_onnx",
    "onnx_session",
    "OnnxExport",
    "save",
    "load",
    "read_recipe",
    "__version__",
]
