"""``save`` / ``load``: weights in safetensors with a JSON recipe that rebuilds the structure, no pickled code.

The file is one ``.safetensors`` file; its header metadata holds ``resconv_recipe``, a JSON document:

.. code-block:: json

    {"format": "resconv_plugin.checkpoint.v2", "resconv_plugin_version": "0.1.0",
     "model": {"name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 3}},
     "structure": [{"path": "layer1.0.conv1", "class": "torch.nn.modules.conv.Conv2d",
                    "attrs": {"in_channels": 44, "out_channels": 44, "groups": 1, ...},
                    "params": {"weight": {"shape": [44, 44, 3, 3], "dtype": "float32"}, "bias": null}, ...}, ...],
     "steps": [{"op": "convert", ...}, {"op": "remove", "names": [...]}, {"op": "fuse"}, ...]}

The structure is read off the model itself (``resconv_plugin.deploy.structure``): so a model changed by anything (our
steps, torch-pruning's pruners used directly, ``timm.utils.reparameterize_model``) reloads. ``save`` checks, before
it writes, that the recipe rebuilds a model whose state dict matches the model's (names and shapes), and raises a
ValueError naming the module otherwise: it never writes a file ``load`` cannot read. ``steps`` is the history of
resconv_plugin's own changes, for people reading the file. ``load`` creates the timm model, reshapes it to the
structure and loads the weights strictly (files of format v1, which replayed the steps, still load). Read the recipe
alone with :func:`read_recipe` (or any safetensors reader: ``safe_open(path, "pt").metadata()``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from resconv_plugin.fx.recipe import recipe_steps
from resconv_plugin.deploy.structure import StructureError, apply_structure, describe
from resconv_plugin._utils import atomic_file, check_module
from resconv_plugin._version import __version__ as _VERSION

__all__ = ["save", "load", "read_recipe", "make_recipe", "build_from_recipe", "check_rebuilds",
           "state_dict_differences", "FORMAT"]

FORMAT = "resconv_plugin.checkpoint.v2"
_FORMAT_V1 = "resconv_plugin.checkpoint.v1"
_META_KEY = "resconv_recipe"
PathLike = Union[str, "os.PathLike[str]"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _model_identity(model: nn.Module, model_name: Optional[str], model_kwargs: Optional[Dict[str, Any]]):
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = model_name or cfg.get("architecture")
    if not name:
        raise ValueError(f"cannot tell which timm architecture this {type(model).__name__} is: pass "
                         "model_name=... (and model_kwargs=...) to save(), or create it with timm.create_model")
    kwargs: Dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first = cfg.get("first_conv")
    if isinstance(first, str):
        try:
            conv = model.get_submodule(first)
            kwargs["in_chans"] = int(conv.in_channels)
        except (AttributeError, TypeError):
            pass
    kwargs.update(model_kwargs or {})
    return name, kwargs


def save(model: nn.Module, path: PathLike, *, model_name: Optional[str] = None,
         model_kwargs: Optional[Dict[str, Any]] = None) -> Path:
    """Save ``model`` (converted, depth-pruned, fused and/or channel-pruned) so that :func:`load` rebuilds it.

    The write is atomic: a temporary file in the same folder, then a rename.

    Args:
        model: a timm model, with the structure changes resconv_plugin recorded on it.
        path: the ``.safetensors`` file to write.
        model_name: the timm architecture (default: ``model.pretrained_cfg["architecture"]``).
        model_kwargs: ``timm.create_model`` keyword arguments (default: ``num_classes`` and ``in_chans`` read off
            the model); given values override.

    Returns:
        The path written.

    Example:
        >>> import timm, resconv_plugin
        >>> resconv_plugin.save(timm.create_model("resnet18"), "/tmp/resnet18.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    recipe = make_recipe(model, model_name=model_name, model_kwargs=model_kwargs)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    check_rebuilds(recipe, state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata={_META_KEY: json.dumps(recipe)})
    return path


def make_recipe(model: nn.Module, *, model_name: Optional[str] = None,
                model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The JSON-able recipe of ``model`` (timm name, kwargs and recorded structure steps) that :func:`save` stores."""
    check_module(model)
    name, kwargs = _model_identity(model, model_name, model_kwargs)
    return {"format": FORMAT, "resconv_plugin_version": _VERSION,
            "model": {"name": name, "kwargs": _jsonable(kwargs)}, "structure": describe(model),
            "steps": _jsonable(recipe_steps(model))}


def check_rebuilds(recipe: Dict[str, Any], state: Dict[str, torch.Tensor]) -> None:
    """Raise a ValueError unless ``recipe`` rebuilds a model whose state dict has the names and shapes of ``state``
    (what :func:`save` checks before writing)."""
    try:
        rebuilt = build_from_recipe(recipe, "save")
    except ValueError as exc:
        raise ValueError(f"cannot save this model: {exc}") from exc
    differences = state_dict_differences(rebuilt.state_dict(), state)
    if differences:
        raise ValueError(f"cannot save this model: rebuilding {recipe['model']['name']} from its description does "
                         f"not give the same tensors ({differences}); nothing was written")


def build_from_recipe(recipe: Dict[str, Any], source: object = "recipe") -> nn.Module:
    """Create the timm model of ``recipe`` and replay its structure steps (weights stay freshly initialised)."""
    import timm

    name, kwargs = recipe["model"]["name"], recipe["model"].get("kwargs", {})
    if not timm.is_model(name):
        from resconv_plugin.timm_glue import close_model_names

        close = close_model_names(name)
        raise ValueError(f"{source}: the recipe is for model {name!r}, which timm does not know"
                         + (f" (close: {', '.join(close)})" if close else "")
                         + "; if a package registers it, import that package before load()")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if "structure" in recipe:
        try:
            apply_structure(model, recipe["structure"])
        except StructureError as exc:
            raise ValueError(f"{source}: {exc}") from exc
        _copy_recipe(model, recipe)
        return model
    for index, step in enumerate(recipe.get("steps", [])):
        try:
            _replay(model, step)
        except Exception as exc:
            raise ValueError(f"{source}: recipe step {index} ({step.get('op')!r}) does not apply to {name}: {exc}") \
                from exc
    return model


def read_recipe(path: PathLike) -> Dict[str, Any]:
    """The JSON recipe stored in a checkpoint written by :func:`save`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable safetensors file, or has no resconv_plugin recipe.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors checkpoint (corrupt or truncated?): {exc}") from exc
    if _META_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file without a resconv_plugin recipe (not written by "
                         "resconv_plugin.save)")
    try:
        recipe = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the recipe is not valid JSON: {exc}") from exc
    if not isinstance(recipe, dict) or recipe.get("format") not in (FORMAT, _FORMAT_V1):
        found = recipe.get("format") if isinstance(recipe, dict) else recipe
        raise ValueError(f"{path}: unsupported recipe format {found!r}, expected {FORMAT} (or {_FORMAT_V1})")
    return recipe


def load(path: PathLike) -> nn.Module:
    """Rebuild the model saved by :func:`save` (in a fresh process too): create, replay the recipe, load weights.

    The model comes back in eval mode on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt file, a recipe for a model timm does not know (import the package that registers it
            first), a recipe step that does not apply, or weights that do not match the rebuilt structure.

    Example:
        >>> model = resconv_plugin.load("/tmp/resnet18.safetensors")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    model = build_from_recipe(read_recipe(path), path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the weights (corrupt?): {exc}") from exc
    _load_state(model, state, path)
    return model.eval()


def _copy_recipe(model: nn.Module, recipe: Dict[str, Any]) -> None:
    """The rebuilt model carries the saved history, so saving it again keeps it."""
    steps = recipe_steps(model)
    steps.clear()
    steps.extend(recipe.get("steps", []))


def _replay(model: nn.Module, step: Dict[str, Any]) -> None:
    from resconv_plugin.fx.convert import convert
    from resconv_plugin.deploy.fuse import fuse
    from resconv_plugin.fx.surgery import remove

    op = step.get("op")
    if op == "convert":
        names = set(step["names"])
        inputs = tuple(torch.zeros(shape) for shape in step["input_shapes"])
        report = convert(model, inputs, level=step.get("level", "layer"), init_gamma=step.get("init_gamma", 1.0),
                         filter_fn=lambda module, name: name in names)
        missing = names - {c.name for c in report.converted}
        if missing:
            raise ValueError(f"layers not convertible here: {sorted(missing)[:5]}")
    elif op == "remove":
        remove(model, list(step["names"]))
    elif op == "fuse":
        fuse(model, inplace=True, training_ok=True)
    elif op == "fold_batchnorm":
        from resconv_plugin.deploy.fold import fold_batchnorms

        names = list(step["names"])
        done = fold_batchnorms(model, names)
        if sorted(done) != sorted(names):
            raise ValueError(f"BatchNorms not foldable here: {sorted(set(names) - set(done))[:5]}")
    elif op == "channel_prune":
        from resconv_plugin.deploy.channel_replay import replay_channel_pruning

        replay_channel_pruning(model, step["history"], step["input_shapes"])
    else:
        raise ValueError(f"unknown recipe step {op!r}")


def state_dict_differences(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]) -> str:
    """What differs between two state dicts (missing / unexpected keys, shape mismatches); "" when they match."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        return ", ".join(parts)
    return ""


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: PathLike) -> None:
    differences = state_dict_differences(model.state_dict(), state)
    if differences:
        raise ValueError(f"{path}: the weights do not match the rebuilt model: {differences}")
    model.load_state_dict(state, strict=True)

