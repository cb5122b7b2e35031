"""``count_flops``: complete FLOP counts on fvcore, per layer, with the convention of ``_fvcore_handles`` (re-exported
as ``resconv_plugin.integrations.fvcore`` (``OP_HANDLES``))."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin.nn.resconv import ResConv
from resconv_plugin._utils import ExampleInputs, as_input_tuple, check_module, eval_mode, format_table, run_example

__all__ = ["count_flops", "FlopReport", "count_params"]


@dataclass(frozen=True)
class FlopReport:
    """FLOPs and parameters of a model on given inputs. ``print(report)`` shows a per-layer table.

    Attributes:
        total: all FLOPs of one forward pass on the example inputs (one multiply-add = 1 flop; the convention of
            ``resconv_plugin.integrations.fvcore`` (``OP_HANDLES``) for everything else).
        by_layer: ``{name: flops}`` for each layer with non-zero FLOPs, in module order. A layer is a module with no
            children, or a conv, linear, BatchNorm (timm's BatchNormAct2d with its activation) or ResConv (conv,
            BatchNorm and gate), each counted whole. Ops a container runs in its own
            forward (a residual add, say) belong to no layer: ``total - sum(by_layer.values())``.
        by_module: fvcore's hierarchical count, ``{module name: flops}`` with ``''`` the whole model.
        by_operator: ``{aten op: flops}``.
        params: number of parameters (shared ones once).
        unsupported: ``{aten op: occurrences}`` of ops nobody counted; empty when the count is complete.
    """

    total: int
    by_layer: Dict[str, int]
    by_module: Dict[str, int] = field(repr=False)
    by_operator: Dict[str, int] = field(repr=False)
    params: int
    unsupported: Dict[str, int]

    def table(self, max_rows: Optional[int] = None) -> str:
        """Per-layer FLOPs and share of the total, then the ops outside layers, the total and the parameters."""
        items = list(self.by_layer.items())
        shown = items if max_rows is None else items[:max_rows]
        rows = [(name, f"{n:,}", f"{100 * n / self.total:.2f}%" if self.total else "-") for name, n in shown]
        if len(shown) < len(items):
            rest = sum(n for _, n in items[len(shown):])
            rows.append((f"... {len(items) - len(shown)} more layers", f"{rest:,}", f"{100 * rest / self.total:.2f}%"))
        outside = self.total - sum(self.by_layer.values())
        rows.append(("(ops outside layers)", f"{outside:,}", f"{100 * outside / self.total:.2f}%" if self.total else "-"))
        rows.append(("total", f"{self.total:,}", "100.00%"))
        text = format_table(["layer", "FLOPs", "share"], rows)
        text += f"\nparameters: {self.params:,}"
        if self.unsupported:
            text += "\nNOT COUNTED (unsupported ops): " + ", ".join(f"{k} x{v}" for k, v in self.unsupported.items())
        return text

    def __str__(self) -> str:
        return self.table()


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``, each shared parameter once."""
    return sum(p.numel() for p in check_module(model).parameters())


# Modules counted whole as one layer, children included (timm's BatchNormAct2d holds its activation as a child).
_WHOLE_LAYERS = (ResConv, nn.Conv2d, nn.Linear, _BatchNorm)


def _layer_names(model: nn.Module) -> List[str]:
    names, inside = [], None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, _WHOLE_LAYERS):
            inside = f"{name}."
            names.append(name)
        elif not any(True for _ in module.children()):
            names.append(name)
    return names


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> FlopReport:
    """Count FLOPs and parameters of ``model`` on ``example_inputs`` with fvcore, completely.

    fvcore's own handles are kept (conv, linear, matmul, BatchNorm, ...); the handles of
    ``resconv_plugin.integrations.fvcore`` (``OP_HANDLES``) add elementwise ops, activations, pools and reductions, so nothing is
    left uncounted in timm CNNs (``report.unsupported`` lists anything that still is). The model is traced in eval
    mode under ``torch.no_grad`` (deployment FLOPs; BatchNorm statistics untouched); training flags are restored.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor or tuple of tensors; FLOPs are for this batch (pass batch size 1 for per-image).

    Returns:
        A :class:`FlopReport`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` has the wrong type.
        ValueError: the model cannot run on ``example_inputs``.

    Example:
        >>> import torch, resconv_plugin
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1, bias=False), torch.nn.ReLU())
        >>> resconv_plugin.count_flops(net, torch.randn(1, 2, 8, 8)).total  # 8*8*2*2*9 MACs + 128 ReLU
        2432
    """
    from fvcore.nn import FlopCountAnalysis

    from resconv_plugin.measure.fvcore_handles import OP_HANDLES

    check_module(model)
    inputs = as_input_tuple(example_inputs)
    with eval_mode(model), torch.no_grad():
        run_example(model, inputs)  # a clear error for inputs that do not fit, before fvcore's jit trace
        analysis = FlopCountAnalysis(model, inputs).set_op_handle(**OP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        fvcore_logger = logging.getLogger("fvcore")
        level = fvcore_logger.level
        fvcore_logger.setLevel(logging.ERROR)
        try:
            total = int(analysis.total())
            by_module = {k: int(v) for k, v in analysis.by_module().items()}
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            unsupported = dict(analysis.unsupported_ops())
        finally:
            fvcore_logger.setLevel(level)
    by_layer = {name: by_module[name] for name in _layer_names(model) if by_module.get(name, 0)}
    return FlopReport(total=total, by_layer=by_layer, by_module=by_module, by_operator=by_operator,
                      params=count_params(model), unsupported=unsupported)
