"""``convert``: turn every eligible conv -> BatchNorm (-> activation) chain of a model into a ResConv, in place."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from resconv_plugin._block import Reason, ResConv, _check_gamma
from resconv_plugin._graph import ConvSite, find_conv_sites
from resconv_plugin._utils import (
    ExampleInputs, as_input_tuple, check_module, eval_mode, format_table, run_example, set_submodule,
)
from resconv_plugin.integrations.timm import split_norm_act

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "SkippedConv"]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ConvertedLayer:
    """One conv that became a ResConv.

    Attributes:
        name: qualified name of the ResConv (the conv's old name).
        norm: qualified name of the BatchNorm it absorbed (now an ``nn.Identity`` or the norm's drop + act tail).
        in_channels, out_channels, kernel_size, groups, dilation: the conv's settings.
        flops: the conv's multiply-adds on the example inputs (fvcore's convention: one multiply-add = 1 flop).
        flops_share: ``flops`` over all conv + linear FLOPs of the model on the same inputs.
    """

    name: str
    norm: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    groups: int
    dilation: Tuple[int, int]
    flops: int
    flops_share: float


@dataclass(frozen=True)
class SkippedConv:
    """A conv that stayed plain, and why.

    Attributes:
        name: the conv's qualified name.
        reason: every reason it stayed plain, joined by '; '.
        kinds: the categories of those reasons (e.g. "stride is not 1"), for summaries.
        subjects: the module types or ops involved (e.g. "LayerNorm"), '' where none.
    """

    name: str
    reason: str
    kinds: Tuple[str, ...] = ()
    subjects: Tuple[str, ...] = ()


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``print(report)`` shows it as tables.

    Attributes:
        converted: the layers converted by this call.
        skipped: every other conv, with the reason it stayed plain.
        already_converted: names of ResConv blocks the model held before this call.
        conv_linear_flops: all conv + linear FLOPs of the model on the example inputs (the share denominator).
    """

    converted: List[ConvertedLayer] = field(default_factory=list)
    skipped: List[SkippedConv] = field(default_factory=list)
    already_converted: List[str] = field(default_factory=list)
    conv_linear_flops: int = 0

    @property
    def converted_flops_share(self) -> float:
        """Share of the model's conv + linear FLOPs that now sits in ResConv blocks converted by this call."""
        return sum(layer.flops_share for layer in self.converted)

    def reason_counts(self) -> Dict[str, int]:
        """How many convs each kind of skip reason applies to, most frequent first."""
        counts = collections.Counter(kind for s in self.skipped for kind in s.kinds)
        return dict(counts.most_common())

    def __str__(self) -> str:
        lines = [
            f"converted {len(self.converted)} conv layers to ResConv "
            f"({100 * self.converted_flops_share:.1f}% of conv+linear FLOPs), skipped {len(self.skipped)}"
            + (f", {len(self.already_converted)} already converted" if self.already_converted else "")
        ]
        if self.converted:
            rows = [(c.name, f"{c.in_channels}->{c.out_channels}", "x".join(map(str, c.kernel_size)), c.groups,
                     "x".join(map(str, c.dilation)), f"{c.flops:,}", f"{100 * c.flops_share:.2f}%")
                    for c in self.converted]
            lines += ["", format_table(["layer", "channels", "kernel", "groups", "dilation", "FLOPs", "share"], rows)]
        if self.skipped:
            lines += ["", format_table(["skipped conv", "reason"], [(s.name, s.reason) for s in self.skipped])]
        return "\n".join(lines)


def _measure(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[Dict[str, int], int, Set[str]]:
    """One eval-mode forward with hooks: per-conv FLOPs, total conv + linear FLOPs, names of modules that ran."""
    flops: Dict[str, int] = {}
    called: Set[str] = set()
    total = 0

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: object) -> None:
            nonlocal total
            called.add(name)
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                n = output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                flops[name] = flops.get(name, 0) + n
                total += n
            elif isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
                total += output.numel() * module.in_features
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with eval_mode(model), torch.no_grad():
            run_example(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return flops, total, called


def _apply_filter(sites: List[ConvSite], modules: Dict[str, nn.Module], filter_fn: Optional[FilterFn]) -> None:
    if filter_fn is None:
        return
    if not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable (module, name) -> bool, got {type(filter_fn).__name__}")
    for site in sites:
        if not site.eligible:
            continue
        keep = filter_fn(modules[site.name], site.name)
        if not isinstance(keep, bool):
            raise TypeError(
                f"filter_fn must return a bool for each conv, got {type(keep).__name__} {keep!r} for '{site.name}'"
            )
        if not keep:
            site.reasons.append(Reason("excluded by filter_fn", "excluded by filter_fn"))


def _no_eligible_message(model: nn.Module, report: ConversionReport) -> str:
    subjects: Dict[str, List[str]] = collections.defaultdict(list)
    for skipped in report.skipped:
        for kind, subject in zip(skipped.kinds, skipped.subjects):
            if subject and subject not in subjects[kind]:
                subjects[kind].append(subject)
    top = "; ".join(
        f"{kind}: {n} convs" + (f" ({', '.join(subjects[kind][:3])})" if subjects[kind] else "")
        for kind, n in report.reason_counts().items()
    )
    return (
        f"{type(model).__name__} has no conv layer that can become a ResConv: 0 of {len(report.skipped)} convs "
        "qualify. A conv qualifies when it keeps its channel count and spatial size (stride 1, odd kernel, 'same' "
        f"padding) and feeds a BatchNorm directly. Why not here: {top}."
    )


def convert(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    init_gamma: float = 1.0,
    filter_fn: Optional[FilterFn] = None,
) -> ConversionReport:
    """Convert every eligible conv -> BatchNorm (-> activation) chain of ``model`` into a :class:`ResConv`, in place.

    A conv is eligible when it has ``in_channels == out_channels``, stride 1, odd kernel sizes and 'same' padding
    (any groups, depthwise included, any dilation), is called once, and its output goes only to a BatchNorm with
    running statistics. The conv becomes a ResConv holding the conv and the BatchNorm; the BatchNorm's slot becomes
    ``nn.Identity`` (or, for timm's ``BatchNormAct2d``, its drop + activation tail), so the identity term is added
    before the activation. With the default ``init_gamma=1`` the model computes exactly what it computed before.

    Chains are found by torch.fx tracing (convs, norms and timm's notrace modules as leaves), layer FLOPs by one
    eval-mode forward of ``example_inputs`` under ``torch.no_grad`` (BatchNorm statistics are not touched).
    Already converted layers are left alone, so converting twice converts nothing new.

    Args:
        model: any CNN, typically from ``timm.create_model``.
        example_inputs: a tensor (or tuple of tensors) the model accepts, e.g. ``torch.randn(1, 3, 224, 224)``.
        init_gamma: initial gate value in [0, 1] for every new ResConv.
        filter_fn: optional ``filter_fn(conv, name) -> bool``; an eligible conv is converted only if it returns True.

    Returns:
        A :class:`ConversionReport` listing converted layers and every skipped conv with its reason.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, bad ``example_inputs`` type, ``filter_fn`` not callable or not
            returning a bool.
        ValueError: the model cannot run on ``example_inputs``, cannot be traced, ``init_gamma`` is outside [0, 1],
            or the model has no eligible layer (the message says why, per reason).

    Example:
        >>> import timm, torch, resconv_plugin
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> report = resconv_plugin.convert(model, torch.randn(1, 3, 64, 64))
        >>> len(report.converted)
        13
    """
    check_module(model)
    inputs = as_input_tuple(example_inputs)
    init_gamma = _check_gamma(init_gamma)
    flops, conv_linear_flops, called = _measure(model, inputs)
    sites, already = find_conv_sites(model, called)
    modules = dict(model.named_modules())
    _apply_filter(sites, modules, filter_fn)

    report = ConversionReport(already_converted=already, conv_linear_flops=conv_linear_flops)
    report.skipped = [
        SkippedConv(s.name, "; ".join(r.text for r in s.reasons), tuple(r.kind for r in s.reasons),
                    tuple(r.subject for r in s.reasons))
        for s in sites if not s.eligible
    ]
    eligible = [s for s in sites if s.eligible]
    if not eligible and not already:
        raise ValueError(_no_eligible_message(model, report))

    for site in eligible:
        conv = modules[site.name]
        bn, tail = split_norm_act(modules[site.norm])
        block = ResConv(conv, bn, init_gamma)
        block.train(conv.training)
        set_submodule(model, site.name, block)
        set_submodule(model, site.norm, tail)
        n = flops.get(site.name, 0)
        report.converted.append(ConvertedLayer(
            name=site.name, norm=site.norm, in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size), groups=conv.groups, dilation=tuple(conv.dilation),
            flops=n, flops_share=n / conv_linear_flops if conv_linear_flops else 0.0,
        ))
    return report
