"""Describe a model's module tree as plain data, and reshape a freshly created model to that description.

This is how :func:`resconv_plugin.save` / :func:`~resconv_plugin.load` rebuild *any* pruned model without pickled
code: whatever changed the structure (conversion, layer removal, fusion, BatchNorm folding, torch-pruning's pruners
used directly, ``timm.utils.reparameterize_model``), the description records, for every module, its class (by
qualified name), its plain attributes (numbers, strings, booleans, None and tuples / lists / dicts of them: channels,
groups, kernel sizes, features, padding...), the shapes and dtypes of its own parameters and buffers, and its
children. Rebuilding creates the timm model, then walks the description: a module of the same class is kept and
reshaped (attributes set, tensors re-created at the recorded shapes); a module of another class is created empty
(``cls.__new__`` + ``nn.Module.__init__``) and given the recorded attributes. Only classes from ``torch.nn``,
``timm`` and ``resconv_plugin`` are created. A module created this way must be fully described by plain attributes:
one that holds anything else (a function, an object) cannot be, and :func:`describe` names it.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional

import torch
from torch import nn

__all__ = ["describe", "apply_structure", "StructureError", "ALLOWED_MODULES"]

#: Packages whose classes a description may create.
ALLOWED_MODULES = ("torch.nn", "timm", "resconv_plugin")
_INTERNAL = set(vars(nn.Module())) | {"_resconv_recipe", "resconv_report"}
_PLAIN = (bool, int, float, str, type(None))


class StructureError(ValueError):
    """A module that cannot be described as plain data, or a description that does not apply."""


class _Opaque(Exception):
    pass


def _encode(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    raise _Opaque


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v) for k, v in value["__dict__"].items()}
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
    return value


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tensor_spec(tensor: Optional[torch.Tensor]) -> Optional[Dict[str, Any]]:
    if tensor is None:
        return None
    spec = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
    if isinstance(tensor, nn.Parameter):
        spec["requires_grad"] = tensor.requires_grad
    return spec


def describe(model: nn.Module) -> List[Dict[str, Any]]:
    """One entry per module (pre-order, the root first): path, class, plain attributes, tensors and children.

    Attributes that are not plain data are listed under ``"opaque"``: a rebuilt module keeps the fresh model's
    values for them, so a module of a class the fresh model does not have there must have none.
    """
    entries = []
    for path, module in model.named_modules(remove_duplicate=False):
        attrs, opaque = {}, []
        for key, value in vars(module).items():
            if key in _INTERNAL:
                continue
            try:
                attrs[key] = _encode(value)
            except _Opaque:
                opaque.append(key)
        entries.append({
            "path": path, "class": _class_name(module), "attrs": attrs, "opaque": sorted(opaque),
            "params": {k: _tensor_spec(v) for k, v in module._parameters.items()},
            "buffers": {k: _tensor_spec(v) for k, v in module._buffers.items()},
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "children": list(module._modules),
        })
    return entries


#: Modules named in files written before the subpackage layout (``resconv_plugin._block`` ...) -> where they are now.
MOVED_MODULES = {"resconv_plugin._block": "resconv_plugin.nn.resconv",
                 "resconv_plugin._gate": "resconv_plugin.nn.block_gate"}


def _import_class(name: str, path: str) -> type:
    module_name, _, qualname = name.rpartition(".")
    module_name = MOVED_MODULES.get(module_name, module_name)
    if not any(module_name == p or module_name.startswith(f"{p}.") for p in ALLOWED_MODULES):
        raise StructureError(f"module '{path or '<root>'}': class {name} is outside {', '.join(ALLOWED_MODULES)}; "
                             "resconv_plugin creates classes from those packages only")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise StructureError(f"module '{path or '<root>'}': {name} is not an nn.Module class in this environment")
    return obj


def _parent_and_name(model: nn.Module, path: str):
    parent_path, _, child = path.rpartition(".")
    try:
        return (model.get_submodule(parent_path) if parent_path else model), child
    except AttributeError:
        raise StructureError(f"module '{path}': its parent '{parent_path}' does not exist in the rebuilt model "
                             "(the description is not of this architecture)") from None


def _get(model: nn.Module, path: str) -> Optional[nn.Module]:
    if not path:
        return model
    parent_path, _, child = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return None
    return parent._modules.get(child)


def _tensor(spec: Dict[str, Any]) -> torch.Tensor:
    return torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))


def _same(tensor: Optional[torch.Tensor], spec: Optional[Dict[str, Any]]) -> bool:
    if tensor is None or spec is None:
        return tensor is None and spec is None
    return list(tensor.shape) == spec["shape"] and str(tensor.dtype).replace("torch.", "") == spec["dtype"]


def _apply_entry(model: nn.Module, entry: Dict[str, Any]) -> None:
    path, name = entry["path"], entry["class"]
    current = _get(model, path)
    if current is None or _class_name(current) != name:
        if not path:
            raise StructureError(f"the model is a {_class_name(model)}, the description a {name}")
        if entry["opaque"]:
            raise StructureError(f"module '{path}' ({name}) holds attributes that are not plain data "
                                 f"({', '.join(entry['opaque'])}) and the fresh model has no {name} there to take "
                                 "them from: it cannot be described")
        cls = _import_class(name, path)
        current = cls.__new__(cls)
        nn.Module.__init__(current)
        parent, child = _parent_and_name(model, path)
        parent._modules[child] = current
    for key, value in entry["attrs"].items():
        object.__setattr__(current, key, _decode(value))
    for key in [k for k in current._parameters if k not in entry["params"]]:
        del current._parameters[key]
    for key, spec in entry["params"].items():
        if key not in current._parameters or not _same(current._parameters[key], spec):
            current._parameters[key] = None if spec is None else nn.Parameter(
                _tensor(spec), requires_grad=spec.get("requires_grad", True))
        elif spec is not None:
            current._parameters[key].requires_grad_(spec.get("requires_grad", True))
    for key in [k for k in current._buffers if k not in entry["buffers"]]:
        del current._buffers[key]
    for key, spec in entry["buffers"].items():
        if key not in current._buffers or not _same(current._buffers[key], spec):
            if spec is not None and key in entry["non_persistent"]:
                raise StructureError(f"module '{path}' ({name}): its non-persistent buffer '{key}' changed shape; "
                                     "its values are not in the state dict, so it cannot be rebuilt")
            current._buffers[key] = None if spec is None else _tensor(spec)
    current._non_persistent_buffers_set = set(entry["non_persistent"])
    for key in [k for k in current._modules if k not in entry["children"]]:
        del current._modules[key]


def apply_structure(model: nn.Module, entries: List[Dict[str, Any]]) -> nn.Module:
    """Reshape ``model`` (freshly created, same root class) in place to the description ``entries``.

    Tensors that had to be re-created are uninitialised: load the weights afterwards.

    Raises:
        StructureError: a class outside the allowed packages, a module that cannot be created from plain data, a
            non-persistent buffer that changed shape, a different root class.
    """
    for entry in entries:
        _apply_entry(model, entry)
    order = {e["path"]: e["children"] for e in entries}
    for path, children in order.items():  # children in the recorded order (module order = execution in Sequential)
        module = _get(model, path)
        if module is not None and list(module._modules) != children:
            module._modules = {k: module._modules[k] for k in children if k in module._modules}
    return model
