"""fvcore glue: op handles that make ``FlopCountAnalysis`` count every op of a CNN, by one documented convention.

fvcore counts convs, linears, matmuls, norms (BatchNorm in eval: 2 flops per element with affine), upsampling and
adaptive average pooling, one multiply-add = 1 flop. It leaves everything else unsupported or ignored (adds, muls,
activations, pools, reductions). The handles here complete the count:

=====================================  =================================================================
op                                     flops
=====================================  =================================================================
elementwise arithmetic (add, mul, ...)  1 per output element
activations (relu, silu, gelu, ...)    1 per output element; ReLU included, which fvcore ignores by default,
                                       so that a ReLU net and a SiLU net are counted alike
softmax / log_softmax                  1 per output element
reductions (mean, sum, amax, ...)      1 per input element
max / avg pooling                      kernel area per output element
adaptive max pooling                   1 per input element (like fvcore's adaptive average pooling)
padding, rounding (pad, ceil, floor)   0 (data movement and shape arithmetic)
=====================================  =================================================================

An elementwise op whose output is a 0-dim tensor counts 0: in a traced graph those are shape arithmetic (timm's
TF-'SAME' padding) or scalar parameter maths (a ResConv's ``1 - gamma``), not per-activation work.
"""

from __future__ import annotations

from math import prod
from typing import Any, Callable, Dict, List

from fvcore.nn.jit_handles import get_shape

__all__ = ["OP_HANDLES", "elementwise_flops", "reduction_flops", "pool_flops", "zero_flops"]

Handle = Callable[[List[Any], List[Any]], int]


def elementwise_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """1 flop per output element; 0 for a 0-dim (scalar) output."""
    shape = get_shape(outputs[0])
    return prod(shape) if shape else 0


def reduction_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """1 flop per input element."""
    shape = get_shape(inputs[0])
    return prod(shape) if shape else 0


def _constant(value: Any) -> Any:
    """The constant behind a traced value; lists built by ``prim::ListConstruct`` from constants included."""
    constant = value.toIValue()
    if constant is None and value.node().kind() == "prim::ListConstruct":
        constant = [item.toIValue() for item in value.node().inputs()]
    return constant


def pool_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """Kernel area per output element (``inputs[1]`` is the kernel size of aten's max/avg pool ops)."""
    shape = get_shape(outputs[0])
    kernel = _constant(inputs[1])
    if isinstance(kernel, (list, tuple)) and len(kernel) == 1:
        kernel = kernel[0]
    area = prod(kernel) if isinstance(kernel, (list, tuple)) else int(kernel) ** (len(shape) - 2)
    return prod(shape) * area


def zero_flops(inputs: List[Any], outputs: List[Any]) -> int:
    """Data movement and shape arithmetic: 0 flops."""
    return 0


def _with_inplace(names: List[str]) -> List[str]:
    return [f"aten::{n}{suffix}" for n in names for suffix in ("", "_")]


_ELEMENTWISE = _with_inplace([
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "sqrt", "rsqrt", "reciprocal", "pow", "exp", "log",
    "maximum", "minimum", "where", "clamp", "clamp_min", "clamp_max", "square",
])
_ACTIVATIONS = _with_inplace([
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "sigmoid", "hardsigmoid", "hardswish",
    "hardtanh", "tanh", "mish", "softplus", "prelu", "glu", "threshold", "log_sigmoid", "hardshrink", "softshrink",
]) + ["aten::softmax", "aten::log_softmax", "aten::_softmax"]
_REDUCTIONS = ["aten::mean", "aten::sum", "aten::amax", "aten::amin", "aten::std", "aten::var", "aten::norm",
               "aten::linalg_vector_norm", "aten::adaptive_max_pool1d", "aten::adaptive_max_pool2d",
               "aten::adaptive_max_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool3d"]
_POOLS = [f"aten::{kind}_pool{d}d" for kind in ("max", "avg") for d in (1, 2, 3)] + [
    "aten::max_pool2d_with_indices"]
_ZERO = ["aten::pad", "aten::ceil", "aten::floor", "aten::round", "aten::clone", "aten::reflection_pad2d",
         "aten::replication_pad2d", "aten::pixel_shuffle", "aten::pixel_unshuffle", "aten::channel_shuffle"]

#: Handles to pass to ``FlopCountAnalysis.set_op_handle(**OP_HANDLES)``.
OP_HANDLES: Dict[str, Handle] = {
    **{op: elementwise_flops for op in _ELEMENTWISE + _ACTIVATIONS},
    **{op: reduction_flops for op in _REDUCTIONS},
    **{op: pool_flops for op in _POOLS},
    **{op: zero_flops for op in _ZERO},
}
