"""``export_onnx``: the deployed model (gates fused, BatchNorms folded) as an ONNX file, checked in ONNX Runtime.

Needs the ``deploy`` extra: ``pip install 'resconv-plugin[deploy]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from resconv_plugin.deploy.fold import deployed
from resconv_plugin._checks import check_int
from resconv_plugin._utils import ExampleInputs, as_input_tuple, atomic_file, check_module

__all__ = ["export_onnx", "OnnxExport", "onnx_session", "MAX_RELATIVE_ERROR"]

#: The largest relative difference between ONNX Runtime and PyTorch an export may show.
MAX_RELATIVE_ERROR = 1e-4
_EXTRA = "pip install 'resconv-plugin[deploy]' (onnx, onnxscript, onnxruntime)"


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and checked.

    Attributes:
        path: the ONNX file.
        max_relative_error: max |ONNX Runtime - PyTorch| / max |PyTorch| over the checked batches.
        checked_batches: the batch sizes run in ONNX Runtime (the example's, plus another with a dynamic batch).
        opset: the ONNX opset of the file.
    """

    path: Path
    max_relative_error: float
    checked_batches: List[int]
    opset: int


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"export_onnx needs the package {module!r}: {_EXTRA}") from exc


def onnx_session(path: Union[str, "os.PathLike[str]"], threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` with all graph optimisations on (``threads`` 0: its default)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batched(inputs: Tuple[torch.Tensor, ...], batch: int) -> Tuple[torch.Tensor, ...]:
    return tuple(t[:1].expand(batch, *t.shape[1:]).clone() + 0.01 * torch.randn(batch, *t.shape[1:],
                                                                                generator=torch.Generator()
                                                                                .manual_seed(batch), dtype=t.dtype)
                 if t.is_floating_point() else t[:1].expand(batch, *t.shape[1:]).clone() for t in inputs)


def _relative_error(session, plain: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> float:
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    with torch.no_grad():
        want = plain(*inputs)
    want = want[0] if isinstance(want, (tuple, list)) else want
    scale = want.abs().max().item() or 1.0
    return (torch.from_numpy(got) - want).abs().max().item() / scale


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: Union[str, "os.PathLike[str]"], *,
                dynamic_batch: bool = True, opset: Optional[int] = None) -> OnnxExport:
    """Export ``model`` as deployed to ONNX and check the file in ONNX Runtime against PyTorch.

    Works on a CPU copy (a model or inputs on a GPU are copied to the CPU; the model is not moved): remaining gates
    are fused, every conv -> BatchNorm pair is folded (:func:`deployed`), the copy is exported with torch's ONNX
    exporter, the file runs in ONNX Runtime (CPU, graph optimisations on) on the
    example inputs (and on another batch size when ``dynamic_batch``), and the output is compared with PyTorch's.
    The file is written atomically, and only when the check passes.

    Args:
        model: any model, converted, depth- and / or channel-pruned; in eval mode.
        example_inputs: the model's inputs (a tensor or a tuple of tensors).
        path: the ``.onnx`` file to write; its folder must exist.
        dynamic_batch: make the batch dimension dynamic (checked at two batch sizes).
        opset: the ONNX opset (default: the exporter's).

    Returns:
        An :class:`OnnxExport` with the measured max relative error.

    Raises:
        ValueError: the model is in training mode, or ONNX Runtime disagrees with PyTorch by more than
            :data:`MAX_RELATIVE_ERROR` (nothing is written then).
        FileNotFoundError: the folder of ``path`` does not exist.
        ImportError: onnx / onnxscript / onnxruntime are missing (install the ``deploy`` extra).

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = resconv_plugin.create_resconv_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
        >>> result = resconv_plugin.export_onnx(model, torch.randn(1, 1, 28, 28), "/tmp/r20.onnx")  # doctest: +SKIP
        >>> result.max_relative_error < 1e-4  # doctest: +SKIP
        True
    """
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode: call model.eval() before export_onnx (the "
                         "export is of the eval-mode function, with BatchNorm running statistics folded)")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {path} does not exist: create {path.parent} first")
    check_int("opset", opset, 7, optional=True)
    onnx = _require("onnx")
    _require("onnxscript")
    _require("onnxruntime")
    # the exporter, ONNX Runtime (a CPU session), .numpy() and the random batches all want the CPU
    plain = deployed(model).cpu()
    inputs = tuple(t.detach().cpu() for t in inputs)
    trace_inputs = _batched(inputs, 2) if dynamic_batch and inputs[0].shape[0] == 1 else inputs
    dynamic_shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) if dynamic_batch else None
    with atomic_file(path) as tmp:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(plain, trace_inputs, tmp, dynamo=True, dynamic_shapes=dynamic_shapes,
                              opset_version=opset, external_data=False, verbose=False)
        session = onnx_session(tmp)
        batches = [inputs[0].shape[0]] + ([inputs[0].shape[0] + 4] if dynamic_batch else [])
        error = max(_relative_error(session, plain, inputs if b == inputs[0].shape[0] else _batched(inputs, b))
                    for b in batches)
        if not error <= MAX_RELATIVE_ERROR:
            raise ValueError(f"ONNX Runtime disagrees with PyTorch: max relative error {error:.3g} > "
                             f"{MAX_RELATIVE_ERROR:g}; nothing was written")
        written_opset = max((o.version for o in onnx.load(tmp, load_external_data=False).opset_import
                             if o.domain in ("", "ai.onnx")), default=0)
    return OnnxExport(path=path, max_relative_error=error, checked_batches=batches, opset=written_opset)
