"""Creating the starting model: a timm name, optionally with a local pretrained file (through timm's own loading)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import nn

from resconv_plugin.models.create import check_model_name
from resconv_plugin.deploy.checkpoint import state_dict_differences
from resconv_plugin.workflow.config import ConfigError
from resconv_plugin.workflow.distributed import Dist

if TYPE_CHECKING:
    from resconv_plugin.workflow.config import CompressionConfig  # noqa: F401

__all__ = ["create_baseline_model", "read_state_dict"]

log = logging.getLogger("resconv")


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file (``{"state_dict": ...}`` / ``{"model": ...}`` unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained-file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_baseline_model(config: "CompressionConfig", out: Path, dist: Optional[Dist] = None) -> nn.Module:
    """``timm.create_model(config.model, ...)``; with ``config.pretrained_file`` (or a ``pretrained_adapter``'s own
    file), timm loads it (classifier reset when ``num_classes`` differs, first conv adapted when ``in_chans``
    differs) after a key check that names the differences. timm reads the (renamed) state dict from
    ``out/pretrained_timm.pth``."""
    import timm

    from resconv_plugin.models.weights import ADAPTER_FILES, ADAPTERS

    dist = dist or Dist()
    name, kwargs = config.model, config.model_factory_kwargs()
    check_model_name(name)
    path = config.pretrained_file
    if config.pretrained_adapter and path is None:
        path = ADAPTER_FILES[config.pretrained_adapter]()
    if path is None:
        return timm.create_model(name, **kwargs)
    state = read_state_dict(Path(path))
    if config.pretrained_adapter:
        state = ADAPTERS[config.pretrained_adapter](state)
    reference = timm.create_model(name, **{**kwargs, "num_classes": _file_classes(name, state),
                                           "in_chans": 3}).state_dict()
    skip = _adapted_keys(name)
    differences = state_dict_differences({k: v for k, v in reference.items() if k not in skip},
                                         {k: v for k, v in state.items() if k not in skip})
    if differences:
        raise ConfigError(f"--pretrained-file {path} does not fit {name}: {differences}"
                         + ("" if config.pretrained_adapter else "; if it comes from another implementation, a "
                            "--pretrained-adapter may rename its keys"))
    timm_file = out / "pretrained_timm.pth"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, timm_file)
    dist.barrier()
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_file),
                              num_classes=_file_classes(name, state)), **kwargs)
    log.info("pretrained weights from %s loaded through timm (%d tensors)", path, len(state))
    return model


def _classifier_keys(model_name: str):
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    heads = (cfg.classifier if cfg is not None else "fc") or "fc"
    return [heads] if isinstance(heads, str) else list(heads)


def _file_classes(model_name: str, state: Dict[str, torch.Tensor]) -> int:
    for head in _classifier_keys(model_name):
        if f"{head}.weight" in state:
            return int(state[f"{head}.weight"].shape[0])
    return 1000


def _adapted_keys(model_name: str):
    """Keys timm itself adapts when loading (first conv for other in_chans): the check leaves them to timm."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    first = (cfg.first_conv if cfg is not None else None) or ""
    firsts = [first] if isinstance(first, str) else list(first)
    return {f"{f}.weight" for f in firsts}
