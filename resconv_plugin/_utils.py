"""Small shared helpers: input validation, temporary eval mode, module swaps, torch-pruning's gate warning."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence, Tuple, Union

import torch
from torch import nn

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def check_module(model: object, arg: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise a TypeError naming what was passed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def as_input_tuple(example_inputs: object) -> Tuple[torch.Tensor, ...]:
    """Normalise ``example_inputs`` (a tensor, or a tuple/list of tensors) to a tuple of positional arguments."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if not example_inputs:
            raise ValueError("example_inputs is empty: pass a tensor such as torch.randn(1, 3, 224, 224)")
        for i, item in enumerate(example_inputs):
            if not isinstance(item, torch.Tensor):
                raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, got {type(item).__name__}")
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a torch.Tensor or a tuple/list of tensors (the model's positional inputs), "
        f"got {type(example_inputs).__name__}"
    )


def describe_inputs(inputs: Tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)


def run_example(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> object:
    """Run ``model(*inputs)``; the errors a model raises on inputs it cannot take (RuntimeError: shapes, dtypes;
    ValueError, TypeError, IndexError) become a ValueError that names the inputs and the model's complaint; any other
    exception propagates unchanged."""
    try:
        return model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model's own error says what it expected
        raise ValueError(
            f"{type(model).__name__} cannot run on example_inputs of shape {describe_inputs(inputs)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then restore each module's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def quiet_about_gates(model: nn.Module) -> Iterator[None]:
    """torch-pruning warns about 'unwrapped parameters' for the gates' scalar gamma and then (having no dimension
    to prune) leaves them alone. Drop that warning when it names only gates; pass every other warning on."""
    gate_names = {n for n, p in model.named_parameters() if p.dim() == 0 and n.endswith("gamma")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        named = re.findall(r"'([^']+)'", text.split("]")[0]) if "Unwrapped parameters detected" in text else None
        if named is not None and set(named) <= gate_names:
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


@contextlib.contextmanager
def atomic_file(path: "os.PathLike[str]") -> Iterator[str]:
    """Write ``path`` all at once or not at all: yield a temporary file name in the same folder; when the block ends
    without an error, move the file to ``path`` with the permissions an ordinary ``open()`` would give it under the
    current umask (``tempfile.mkstemp`` makes it private); on an error, delete it and leave ``path`` as it was.
    The folder must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``model.set_submodule`` exists only in recent torch)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numeric-looking columns right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(_NUMBER.match(row[i]) for row in cells[1:]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in cells[1:]])


_NUMBER = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?\s*(%|[kMGT])?$")
