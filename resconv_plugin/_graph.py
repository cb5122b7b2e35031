"""Finding conv -> BatchNorm chains in any model by tracing it with torch.fx.

Convs and norms are traced as leaves, and so are the modules timm marks as not traceable. For every conv the tracer
sees, we look at what consumes its output: a conv is a candidate when its only consumer is a BatchNorm that it feeds
directly. Everything that stops a conv from qualifying is recorded as a human-readable reason.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resconv_plugin._block import Reason, ResConv, bn_compatibility, identity_compatibility
from resconv_plugin.integrations import timm as timm_glue

__all__ = ["ConvSite", "find_conv_sites"]


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

    _always_leaf = (nn.Conv2d, _BatchNorm, ResConv)

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(timm_glue.tracer_autowrap_functions()))
        self._timm_leaves = tuple(timm_glue.tracer_leaf_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._always_leaf) or isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.Graph:
    """Trace ``model`` symbolically (nothing is executed); a failure becomes a ValueError that says why."""
    try:
        return _LeafTracer().trace(model)
    except Exception as exc:
        raise ValueError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). resconv_plugin finds "
            "conv -> BatchNorm chains by symbolic tracing; models with data-dependent control flow in forward() "
            "need that part wrapped in a module registered with timm.layers.register_notrace_module."
        ) from exc


# Ops that only move data: when one follows a conv, the summary names what comes after it.
_VIEW_OPS = {"permute", "reshape", "view", "contiguous", "flatten", "transpose", "squeeze", "unsqueeze"}


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
        if len(nodes) > 1:
            site.reasons.append(Reason("output used more than once", f"called {len(nodes)} times in forward()"))
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
        if len(call_nodes[user.target]) > 1:
            site.reasons.append(Reason("output used more than once", f"its BatchNorm '{user.target}' is called "
                                       f"{len(call_nodes[user.target])} times"))
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
