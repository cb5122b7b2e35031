"""fvcore glue (public names): the op handles with which ``resconv_plugin.count_flops`` completes fvcore's
``FlopCountAnalysis`` (one multiply-add = 1 flop; the convention is documented in ``resconv_plugin.measure.fvcore_handles``,
where the core's single FLOPs definition lives). Register them on your own analysis with
``analysis.set_op_handle(**OP_HANDLES)``.
"""

from resconv_plugin.measure.fvcore_handles import (  # noqa: F401
    OP_HANDLES, elementwise_flops, pool_flops, reduction_flops, zero_flops,
)

__all__ = ["OP_HANDLES", "elementwise_flops", "reduction_flops", "pool_flops", "zero_flops"]
