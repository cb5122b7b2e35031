"""What a model costs: FLOPs (fvcore, one convention everywhere) and latency measured on this machine.

* :mod:`~resconv_plugin.measure.flops`: :func:`count_flops`, :func:`count_params`;
* :mod:`~resconv_plugin.measure.fvcore_handles`: the op handles that make fvcore count every op;
* :mod:`~resconv_plugin.measure.latency`: :func:`median_latency`, :func:`interleaved_latencies` (CUDA-synchronised);
* :mod:`~resconv_plugin.measure.latency_cost`: :class:`LatencyCost`, the latency of a deployed model in the runtime
  it runs in (eager, ``torch.compile``, ONNX Runtime, OpenVINO, TensorRT).
"""

from resconv_plugin.measure.flops import FlopReport, count_flops, count_params
from resconv_plugin.measure.latency import interleaved_latencies, median_latency, module_latencies
from resconv_plugin.measure.latency_cost import RUNTIMES, LatencyCost

__all__ = ["count_flops", "count_params", "FlopReport", "median_latency", "interleaved_latencies", "module_latencies",
           "LatencyCost", "RUNTIMES"]
