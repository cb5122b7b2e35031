"""The gate modules and the fusion maths: what a converted model is made of.

* :mod:`~resconv_plugin.nn.resconv`: :class:`ResConv`, the layer-level gate ``gamma * bn(conv(x)) + (1 - gamma) * x``,
  and the rules for which convs can carry one;
* :mod:`~resconv_plugin.nn.block_gate`: :class:`BlockGate`, the block-level gate ``x + gamma * F(x)``;
* :mod:`~resconv_plugin.nn.removed`: :class:`RemovedLayer`, the identity that stands where a gated layer was removed;
* :mod:`~resconv_plugin.nn.fusion`: the fusion maths (stateless tensor functions, float64).
"""

from resconv_plugin.nn.block_gate import BlockGate
from resconv_plugin.nn.fusion import add_identity, fold_batchnorm, fuse_resconv_params
from resconv_plugin.nn.removed import RemovedLayer
from resconv_plugin.nn.resconv import ResConv, identity_compatibility

__all__ = ["ResConv", "BlockGate", "RemovedLayer", "identity_compatibility", "fold_batchnorm", "add_identity",
           "fuse_resconv_params"]
