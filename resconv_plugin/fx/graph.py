"""Finding conv -> BatchNorm chains in any model by tracing it with torch.fx.

Convs and norms are traced as leaves, and so are the modules timm marks as not traceable. For every conv the tracer
sees, we look at what consumes its output: a conv is a candidate when its only consumer is a BatchNorm that it feeds
directly. Everything that stops a conv from qualifying is recorded as a human-readable reason.
"""

from __future__ import annotations

import collections
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin.nn.resconv import Reason, ResConv, bn_compatibility, identity_compatibility
from resconv_plugin.nn.block_gate import BlockGate
from resconv_plugin.nn.removed import RemovedLayer
from resconv_plugin import timm_glue

__all__ = ["ConvSite", "BlockSite", "call_counts", "find_conv_sites", "find_residual_blocks", "trace"]


@dataclass
class ConvSite:
    """One ``nn.Conv2d`` of a model, the BatchNorm that directly follows it (if any), and why it is not eligible."""

    name: str
    norm: Optional[str] = None
    reasons: List[Reason] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return not self.reasons


class _LeafTracer(torch.fx.Tracer):
    """An FX tracer that keeps convs, norms, ResConvs and timm's notrace modules as single nodes."""

    _always_leaf = (nn.Conv2d, _BatchNorm, ResConv, BlockGate, RemovedLayer)

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(timm_glue.tracer_autowrap_functions()))
        self._timm_leaves = tuple(timm_glue.tracer_leaf_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._always_leaf) or isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.Graph:
    """Trace ``model`` symbolically (nothing is executed); a tracing failure (what torch.fx raises on code it cannot
    follow: TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError on a Proxy) becomes a ValueError
    that says why; any other exception propagates unchanged."""
    try:
        return _LeafTracer().trace(model)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError) as exc:
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). resconv_plugin finds "
            "conv -> BatchNorm chains by symbolic tracing; models with data-dependent control flow in forward() "
            "need that part wrapped in a module registered with timm.layers.register_notrace_module."
        ) from exc


# Ops that only move data: when one follows a conv, the summary names what comes after it.
_VIEW_OPS = {"permute", "reshape", "view", "contiguous", "flatten", "transpose", "squeeze", "unsqueeze"}


def call_counts(graph: torch.fx.Graph) -> Dict[str, int]:
    """How many times each submodule (by qualified name) is called in ``graph``."""
    return dict(collections.Counter(n.target for n in graph.nodes if n.op == "call_module"))


def _describe(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.target}"


def _describe_next(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Tuple[str, str]:
    """``(subject, text)`` naming what consumes ``node``, looking through single-use view ops."""
    path = []
    while True:
        path.append(_describe(node, modules))
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op == "call_module" or name not in _VIEW_OPS or len(node.users) != 1:
            break
        node = next(iter(node.users))
    where = f" '{node.target}'" if node.op == "call_module" else ""
    return path[-1], " -> ".join(path) + where


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def find_conv_sites(model: nn.Module, called: Optional[Set[str]] = None) -> Tuple[List[ConvSite], List[str]]:
    """Classify every ``nn.Conv2d`` of ``model`` for conversion.

    Args:
        model: the model to inspect (not modified, not run).
        called: names of modules that ran in a forward pass, to tell unused convs from invisible ones.

    Returns:
        ``(sites, already_converted)``: one :class:`ConvSite` per conv outside ResConv blocks, in module order, and
        the names of the ResConv blocks the model already holds.
    """
    modules = dict(model.named_modules())
    graph = trace(model)
    call_nodes: Dict[str, List[torch.fx.Node]] = collections.defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            call_nodes[node.target].append(node)

    calls = call_counts(graph)
    already = [name for name, m in modules.items() if isinstance(m, ResConv)]
    inside_resconv = {f"{name}.conv" for name in already}
    sites = []
    for name, module in modules.items():
        if not isinstance(module, nn.Conv2d) or name in inside_resconv:
            continue
        site = ConvSite(name)
        sites.append(site)
        nodes = call_nodes.get(name, [])
        if not nodes:
            site.reasons.append(_why_unseen(name, modules, call_nodes, called))
            continue
        site.reasons.extend(identity_compatibility(module))
        owner = next((a for a in _ancestors(name) if timm_glue.reparameterizes_itself(modules[a])), None)
        if owner is not None:
            kind = type(modules[owner]).__name__
            site.reasons.append(Reason("inside a block that fuses itself", f"inside {kind} '{owner}', which fuses "
                                       "itself (timm reparameterize_model)", kind))
        if calls[name] > 1:
            site.reasons.append(Reason("output used more than once", f"called {calls[name]} times in forward()"))
            continue
        users = list(nodes[0].users)
        if len(users) != 1:
            site.reasons.append(Reason("output used more than once", f"output used by {len(users)} consumers: "
                                       + ", ".join(_describe(u, modules) for u in users)))
            continue
        user = users[0]
        norm = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(norm, _BatchNorm):
            subject, text = _describe_next(user, modules)
            site.reasons.append(Reason("not followed by a BatchNorm", f"followed by {text}, not BatchNorm", subject))
            continue
        site.norm = user.target
        site.reasons.extend(bn_compatibility(norm, module.out_channels, allow_norm_act=True))
        if calls.get(user.target, 0) > 1:
            site.reasons.append(Reason("output used more than once", f"its BatchNorm '{user.target}' is called "
                                       f"{calls[user.target]} times"))
    return sites, already


def _why_unseen(name: str, modules: Dict[str, nn.Module], call_nodes: Dict[str, list],
                called: Optional[Set[str]]) -> Reason:
    leaf = next((a for a in _ancestors(name) if a in call_nodes), None)
    if leaf is not None:
        kind = type(modules[leaf]).__name__
        return Reason("inside a module torch.fx does not trace into",
                      f"inside {kind} '{leaf}', which torch.fx traces as one leaf module", kind)
    if called is not None and name not in called:
        return Reason("not called in forward()", "not called in forward()")
    return Reason("not visible to torch.fx", "not visible to torch.fx")


# ---------------------------------------------------------------------------------------------------------------------
# Residual blocks and removal analysis
# ---------------------------------------------------------------------------------------------------------------------

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclass
class BlockSite:
    """A residual block ``[act](shortcut + branch)`` with an identity shortcut.

    Attributes:
        name: the block module (the innermost module whose forward runs the residual add).
        norm: the BatchNorm that ends the branch (where a BlockGate goes), if found.
        act: the activation module applied after the add inside the block, if any.
        reasons: why the block cannot be gated (empty when it can).
    """

    name: str
    norm: Optional[str] = None
    act: Optional[str] = None
    reasons: List[Reason] = field(default_factory=list)
    gated: bool = False
    shortcut: Optional[torch.fx.Node] = field(default=None, repr=False)

    @property
    def eligible(self) -> bool:
        return not self.reasons


def _scope(node: torch.fx.Node) -> List[str]:
    return list(node.meta.get("nn_module_stack", {}).keys())


def _inside(node: torch.fx.Node, block: str) -> bool:
    return block in _scope(node)


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def _module(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[nn.Module]:
    return modules.get(node.target) if node.op == "call_module" else None


def _tensor_args(node: torch.fx.Node) -> List[torch.fx.Node]:
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


def _walk_back_to_norm(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[torch.fx.Node]:
    """From the branch operand of a residual add back to the BatchNorm that ends the branch.

    Passes only through modules that map 0 to 0 (dropout, drop-path, identity) and through squeeze-excite
    products ``y * gate(y)``, so that zeroing the BatchNorm output zeroes the branch.
    """
    while node is not None:
        module = _module(node, modules)
        if isinstance(module, (_BatchNorm, BlockGate)):
            return node
        if module is not None and timm_glue.passes_through(module):
            node = node.args[0]
            continue
        if (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
                node.op == "call_method" and node.target == "mul"):
            candidates = [a for a in _tensor_args(node) if not _is_gate(a, modules)]
            node = candidates[0] if len(candidates) == 1 else None
            continue
        return None
    return None


def _is_gate(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    module = _module(node, modules)
    if module is not None:
        return timm_glue.is_sigmoid_gate(module)
    name = getattr(node.target, "__name__", str(node.target))
    return "sigmoid" in name


def _skip_identity_modules(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> torch.fx.Node:
    while isinstance(_module(node, modules), nn.Identity):
        node = node.args[0]
    return node


def find_residual_blocks(model: nn.Module, graph: Optional[torch.fx.Graph] = None) -> List[BlockSite]:
    """Find every residual add with an identity shortcut and classify its block for block-level gating."""
    modules = dict(model.named_modules())
    graph = graph if graph is not None else trace(model)
    calls = call_counts(graph)
    by_block: Dict[str, List[torch.fx.Node]] = collections.defaultdict(list)
    for node in graph.nodes:
        if _is_add(node) and len(_tensor_args(node)) == 2 and _scope(node):
            by_block[_scope(node)[-1]].append(node)

    sites = []
    for block, adds in by_block.items():
        site = BlockSite(block)
        if len(adds) > 1:
            continue  # several adds in one forward (Res2Net scales, HRNet fusion): not a single residual block
        add = adds[0]
        a, b = _tensor_args(add)
        outside = [not _inside(_skip_identity_modules(x, modules), block) for x in (a, b)]
        if outside.count(True) != 1:
            continue  # the shortcut is computed inside the block (projection) or both operands come from outside
        sites.append(site)
        branch = b if outside[0] else a
        site.shortcut = _skip_identity_modules(a if outside[0] else b, modules)
        norm_node = _walk_back_to_norm(branch, modules)
        if norm_node is not None and isinstance(_module(norm_node, modules), BlockGate):
            site.norm, site.gated = norm_node.target, True
        elif norm_node is None:
            site.reasons.append(Reason("no BatchNorm at the end of the branch",
                                       f"the residual branch does not end in a BatchNorm (ends in "
                                       f"{_describe(branch, modules)})"))
        else:
            site.norm = norm_node.target
            norm = modules[site.norm]
            if isinstance(norm, timm_glue.NORM_ACT_TYPES) and not isinstance(getattr(norm, "act", None), nn.Identity):
                site.reasons.append(Reason("BatchNorm with activation ends the branch",
                                           f"'{site.norm}' applies {type(norm.act).__name__} inside"))
            if calls.get(site.norm, 0) > 1:
                site.reasons.append(Reason("output used more than once", f"'{site.norm}' is called more than once"))
        users = list(add.users)
        if len(users) == 1 and _inside(users[0], block) and _module(users[0], modules) is not None:
            act = users[0]
            if any(_inside(u, block) for u in act.users):
                site.reasons.append(Reason("block computes more after the add",
                                           f"'{block}' computes more after its residual add"))
            site.act = act.target
        elif any(_inside(u, block) for u in users):
            site.reasons.append(Reason("block computes more after the add",
                                       f"'{block}' computes more after its residual add"))
    return sites


# Outputs of these modules / functions are >= 0; these let a non-negative input through unchanged in sign.
_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_SIGN_KEEPING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def is_nonnegative(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether the tensor of ``node`` is provably >= 0 (it comes from a ReLU-like op through sign-keeping ops)."""
    while node is not None:
        module = _module(node, modules)
        if module is not None:
            act = getattr(module, "act", None) if isinstance(module, timm_glue.NORM_ACT_TYPES) else module
            if isinstance(act, _NONNEG_MODULES):
                return True
            if timm_glue.passes_through(module) or isinstance(module, _SIGN_KEEPING):
                node = node.args[0]
                continue
            return False
        if node.op == "call_function" and getattr(node.target, "__name__", "") in ("relu", "relu6", "sigmoid"):
            return True
        return False
    return False


def following_activation(node: torch.fx.Node, modules: Dict[str, nn.Module],
                         calls: Dict[str, int]) -> Optional[torch.fx.Node]:
    """The activation module that consumes ``node`` (through pass-through modules), if it alone consumes it."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        module = _module(node, modules)
        if module is None or calls.get(node.target, 0) > 1:
            return None
        if timm_glue.passes_through(module):
            continue
        return node if isinstance(module, (nn.ReLU, nn.ReLU6)) else None
    return None


def activation_is_identity(act_node: torch.fx.Node, input_node: torch.fx.Node,
                           modules: Dict[str, nn.Module]) -> bool:
    """Whether the activation at ``act_node`` is the identity on the tensor of ``input_node``.

    ReLU is, on a non-negative input; ReLU6 is, on the output of a ReLU6 (non-negative and at most 6).
    """
    act = modules[act_node.target]
    if isinstance(act, nn.ReLU6):
        source = input_node
        while _module(source, modules) is not None and timm_glue.passes_through(_module(source, modules)):
            source = source.args[0]
        return isinstance(_module(source, modules), nn.ReLU6)
    return isinstance(act, nn.ReLU) and is_nonnegative(input_node, modules)
