"""Replaying a recorded torch-pruning history on a freshly built model (checkpoints of format v1 stored channel
pruning as such a history), and silencing torch-pruning's warning about the gates' scalar parameters.

The gates' scalar ``gamma`` parameters are "unwrapped parameters" to torch-pruning, which finds no dimension to prune
in a 0-dim tensor and leaves them alone; its warning about them is dropped, any other warning passes.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import List, Tuple

import torch
from torch import nn

from resconv_plugin.fx.recipe import record_step

__all__ = ["quiet_about_gates", "replay_channel_pruning"]


@contextlib.contextmanager
def quiet_about_gates(model: nn.Module):
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


def replay_channel_pruning(model: nn.Module, history: list, input_shapes: List[List[int]]) -> None:
    """Redo a recorded channel-pruning history on ``model`` (used by ``resconv_plugin.load``)."""
    inputs: Tuple[torch.Tensor, ...] = tuple(torch.zeros(shape) for shape in input_shapes)
    flags = [(m, m.training) for m in model.modules()]
    with quiet_about_gates(model):
        import torch_pruning as tp  # here: ``import resconv_plugin`` stays lean

        graph = tp.DependencyGraph().build_dependency(model,
                                                      example_inputs=inputs[0] if len(inputs) == 1 else inputs)
    for m, flag in flags:
        m.training = flag
    graph.load_pruning_history([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history])
    record_step(model, "channel_prune", history=graph.pruning_history(), input_shapes=input_shapes)
