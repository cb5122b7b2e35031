"""Graph discovery and surgery (torch.fx): where gates can go, putting them there, taking gated layers out.

* :mod:`~resconv_plugin.fx.graph`: conv -> BatchNorm chains and residual blocks found by tracing;
* :mod:`~resconv_plugin.fx.convert`: :func:`convert` (in place);
* :mod:`~resconv_plugin.fx.surgery`: removing gated layers / blocks, :func:`freeze_gates`, :func:`gated_modules`;
* :mod:`~resconv_plugin.fx.recipe`: the structural steps a model records (read back by ``save`` / ``load``).
"""

from resconv_plugin.fx.convert import ConversionReport, ConvertedLayer, SkippedConv, convert
from resconv_plugin.fx.surgery import Removal, freeze_gates, gated_modules, remove

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "SkippedConv", "Removal", "remove", "gated_modules",
           "freeze_gates"]
