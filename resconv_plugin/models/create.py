"""``create_resconv_model``: a timm model, converted to ResConv layers (or gated blocks) in one call.

Named apart from ``timm.create_model``, which returns the model unconverted; ``create_model``, its name before, still
works for one release with a ``FutureWarning``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from resconv_plugin._deprecation import renamed_attributes
from resconv_plugin._utils import ExampleInputs

__all__ = ["create_resconv_model", "default_example_input", "check_model_name"]


def check_model_name(name: str) -> str:
    """``name`` if timm knows it, else a ValueError that lists the closest registered names."""
    import timm

    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if not timm.is_model(name):
        from resconv_plugin.timm_glue import close_model_names

        close = close_model_names(name)
        raise ValueError(f"unknown model {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else
                                                     "; `timm.list_models('*pattern*')` lists the known names"))
    return name


def default_example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero input of the model's default size (``pretrained_cfg["input_size"]``, channels of its first conv)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    first = cfg.get("first_conv")
    if isinstance(first, str):
        try:
            channels = model.get_submodule(first).in_channels
        except AttributeError:
            pass
    return torch.zeros(batch, channels, height, width)


def create_resconv_model(model_name: str, *, level: str = "layer", init_gamma: float = 1.0,
                 example_inputs: Optional[ExampleInputs] = None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` followed by :func:`resconv_plugin.convert`.

    Any timm (or timm-registered) name works; pretrained weights load before conversion, which keeps the function.

    Args:
        model_name: a timm model name (``timm.list_models()``; the CIFAR networks of this package included).
        level: ``"layer"`` (ResConv on every eligible conv) or ``"block"`` (a gate on every residual block).
        init_gamma: the gates' initial value (1.0 leaves the model's function unchanged).
        example_inputs: inputs for tracing (default: zeros of the model's default input size).
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``in_chans``, ``pretrained``, ...).

    Returns:
        The converted model; its :class:`~resconv_plugin.ConversionReport` is ``model.resconv_report``.

    Example:
        >>> import resconv_plugin
        >>> model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> len(model.resconv_report.converted)  # stem and stage-transition convs change shape: not eligible
        16
    """
    import timm

    from resconv_plugin.fx.convert import convert

    model = timm.create_model(check_model_name(model_name), **timm_kwargs)
    inputs = example_inputs if example_inputs is not None else default_example_input(model)
    report = convert(model, inputs, level=level, init_gamma=init_gamma)
    object.__setattr__(model, "resconv_report", report)
    return model


__getattr__ = renamed_attributes(__name__, {"create_model": (__name__, "create_resconv_model")})
