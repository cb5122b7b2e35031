"""Replaying a recorded torch-pruning history on a freshly built model (checkpoints of format v1 stored channel
pruning as such a history).

The gates' scalar ``gamma`` parameters are "unwrapped parameters" to torch-pruning, which finds no dimension to prune
in a 0-dim tensor and leaves them alone; its warning about them is dropped, any other warning passes
(:func:`~resconv_plugin._utils.quiet_about_gates`, shared with :mod:`~resconv_plugin.pruning.channels`).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from resconv_plugin._utils import quiet_about_gates
from resconv_plugin.fx.recipe import record_step

__all__ = ["quiet_about_gates", "replay_channel_pruning"]


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
