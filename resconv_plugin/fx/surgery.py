"""Removing gated layers and blocks from a model: what each removal replaces, and doing it.

A ResConv at ``gamma = 0`` is the identity; a gated block at ``gamma = 0`` is ``[act](x)``. Removal replaces a layer
by :class:`~resconv_plugin.nn.RemovedLayer` (the identity; a copy while autograd records, so the host's in-place ops
cannot break the backward pass), a block by ``nn.Identity``, and, where the activation that follows is provably the
identity on the removed module's input (ReLU on a non-negative tensor, ReLU6 on a ReLU6 output), that activation
too. Otherwise the activation stays; an in-place one is switched to ``inplace=False`` where the tensor it now reads
is read elsewhere as well (a residual shortcut), which it would otherwise overwrite. At ``gamma != 0`` the same
replacement changes the function; the caller measures and reports by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch.fx
from torch import nn

from resconv_plugin.nn.resconv import ResConv
from resconv_plugin.nn.block_gate import BlockGate
from resconv_plugin.nn.removed import RemovedLayer
from resconv_plugin.fx.graph import (
    _module, activation_is_identity, call_counts, find_residual_blocks, following_activation, trace,
)
from resconv_plugin import timm_glue
from resconv_plugin.fx.recipe import record_step
from resconv_plugin._checks import check_bool
from resconv_plugin._utils import check_module, set_submodule

__all__ = ["Removal", "gated_modules", "freeze_gates", "plan_removal", "remove"]


@dataclass(frozen=True)
class Removal:
    """One removed layer or block.

    Attributes:
        name: the ResConv (layer) or the residual block (block).
        kind: ``"layer"`` or ``"block"``.
        gamma: the gate value at removal (0 means the removal was exact).
        replaced_by: ``"identity"``, or ``"activation"`` for a block whose trailing activation had to stay.
        removed_activation: name of an activation module that became ``nn.Identity`` because it was provably the
            identity on its input, else None.
        kept_activation: for ``replaced_by == "activation"``, the block's activation module that now stands in its
            place, else None.
    """

    name: str
    kind: str
    gamma: float
    replaced_by: str = "identity"
    removed_activation: Optional[str] = None
    kept_activation: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def gated_modules(model: nn.Module, graph: Optional[torch.fx.Graph] = None) -> Dict[str, nn.Module]:
    """``{name: gate}`` in module order: each ResConv under its own name, each BlockGate under its block's name."""
    blocks = {}
    if any(isinstance(m, BlockGate) for m in model.modules()):
        modules = dict(model.named_modules())
        blocks = {s.name: modules[s.norm] for s in find_residual_blocks(model, graph) if s.gated}
    gates = {}
    for name, module in model.named_modules():
        if isinstance(module, ResConv):
            gates[name] = module
        elif name in blocks:
            gates[name] = blocks[name]
    return gates


def freeze_gates(model: nn.Module, frozen: bool = True) -> int:
    """Stop (or resume) training the gates of every ResConv and BlockGate left in ``model``; returns how many.

    Call it after :meth:`LayerPruner.step`, before fine-tuning. During sparsity training the pruner keeps each gate in
    [0, 1]; afterwards nothing does, and a free scalar gate, whose gradient sums over a whole feature map, can run far
    outside the convex range at fine-tuning learning rates (cifar_resnet56 on Fashion-MNIST, 27 layers removed, one
    epoch at lr 0.02: gates reached -1.1 and 3.7 and top-1 fell from 63% to 40%; frozen it does not happen). A frozen
    gate keeps its value (it is fused like any other); an optimizer built afterwards leaves it out, and one built
    before skips it (its gradient stays None).

    Args:
        model: a converted model.
        frozen: True to freeze, False to make the gates trainable again.

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1)
        >>> _ = resconv_plugin.convert(model, torch.randn(2, 1, 28, 28))
        >>> resconv_plugin.freeze_gates(model)
        16
    """
    check_module(model)
    check_bool("frozen", frozen)
    gates = gated_modules(model)
    for gate in gates.values():
        gate.gamma.requires_grad_(not frozen)
    return len(gates)


def plan_removal(model: nn.Module, name: str, graph: Optional[torch.fx.Graph] = None) -> Removal:
    """What removing the gated layer or block ``name`` would replace (the model is not changed)."""
    graph = graph if graph is not None else trace(model)
    modules = dict(model.named_modules())
    calls = call_counts(graph)
    module = modules.get(name)
    if isinstance(module, ResConv):
        node = next(n for n in graph.nodes if n.op == "call_module" and n.target == name)
        act = following_activation(node, modules, calls)
        removed = act.target if act is not None and activation_is_identity(act, node.args[0], modules) else None
        return Removal(name, "layer", module.gamma.item(), removed_activation=removed)
    site = next((s for s in find_residual_blocks(model, graph) if s.name == name and s.gated), None)
    if site is None:
        raise ValueError(f"'{name}' is neither a ResConv nor a gated residual block of this model")
    gamma = modules[site.norm].gamma.item()
    if site.act is None:
        return Removal(name, "block", gamma)
    act_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == site.act)
    if activation_is_identity(act_node, site.shortcut, modules):
        return Removal(name, "block", gamma, removed_activation=site.act)
    return Removal(name, "block", gamma, replaced_by="activation", kept_activation=site.act)


def remove(model: nn.Module, names: List[str]) -> List[Removal]:
    """Remove the gated layers / blocks ``names`` from ``model`` in place, in order; returns what was done.

    Each removal is planned on the structure left by the previous ones (re-traced), so an activation is dropped
    only when it is provably the identity in the final network. A gated layer inside a block removed here goes with
    the block (it gets no entry of its own). The step is recorded in the model's recipe.
    """
    done = []
    for name in names:
        if any(name.startswith(f"{r.name}.") for r in done if r.kind == "block"):
            continue  # inside a block removed in this call: gone with it
        removal = plan_removal(model, name)
        if removal.kind == "layer":
            set_submodule(model, name, RemovedLayer())
            if removal.removed_activation:
                set_submodule(model, removal.removed_activation, nn.Identity())
        else:
            kept = model.get_submodule(removal.kept_activation) if removal.kept_activation else nn.Identity()
            set_submodule(model, name, kept)
        done.append(removal)
    if done:
        _protect_shared_inputs(model, [r.name for r in done])
        record_step(model, "remove", names=[r.name for r in done])
    return done


def _protect_shared_inputs(model: nn.Module, names: List[str]) -> List[str]:
    """Switch off ``inplace`` on an activation that now reads, through identities, a tensor other nodes read too.

    After a removal an in-place activation can act on what used to be the removed module's input (the activation
    after a removed layer, or the one standing in for a removed block); where that tensor also feeds a residual
    shortcut, writing over it would change the network's output. Returns the activations switched.
    """
    graph = trace(model)
    modules = dict(model.named_modules())

    def module(node):
        return _module(node, modules)

    def shared(node):  # whether the tensor ``node`` returns, followed up through identities, has other readers
        source, chain = node, []
        while isinstance(module(source), nn.Identity):
            chain.append(source)
            source = source.args[0]
        readers = {user for n in [source] + chain for user in n.users} - set(chain)
        return len(readers) > 1

    switched = []
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target in names]:
        while True:  # from the removed module down through identities / pass-throughs to the first real op
            op = module(node)
            if op is not None and getattr(op, "inplace", False) is True:
                if shared(node.args[0]):
                    op.inplace = False
                    switched.append(node.target)
                break
            if op is None or not timm_glue.passes_through(op) or len(node.users) != 1:
                break
            node = next(iter(node.users))
    return switched
