"""Adapters that rename third-party state dicts to timm's keys (public names). They live in the core
(``resconv_plugin.models.weights``, which documents them), because the workflow loads pretrained files through them;
this module re-exports them for users.
"""

from resconv_plugin.models.weights import (  # noqa: F401
    ADAPTER_FILES, ADAPTER_MODELS, ADAPTERS, efficientnet_lite0_file, efficientnet_lite0_to_timm,
)

__all__ = ["ADAPTERS", "ADAPTER_MODELS", "ADAPTER_FILES", "efficientnet_lite0_to_timm", "efficientnet_lite0_file"]
