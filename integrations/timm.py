"""timm glue (public names): which modules to treat as leaves when tracing, timm's conv and norm-act variants, its
fusion protocol, the model registry's close names. The facts live in the core (``resconv_plugin.timm_glue``, which
documents them), because conversion, tracing and folding are built on them; this module re-exports them for users.
"""

from resconv_plugin.timm_glue import (  # noqa: F401
    NORM_ACT_TYPES, REPARAM_METHODS, SAME_PADDING_CONVS, close_model_names, is_sigmoid_gate, passes_through,
    reparameterizes_itself, split_norm_act, tracer_autowrap_functions, tracer_leaf_modules,
)

__all__ = ["REPARAM_METHODS", "SAME_PADDING_CONVS", "NORM_ACT_TYPES", "tracer_leaf_modules",
           "tracer_autowrap_functions", "reparameterizes_itself", "split_norm_act", "passes_through",
           "is_sigmoid_gate", "close_model_names"]
