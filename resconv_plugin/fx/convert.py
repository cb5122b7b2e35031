"""``convert``: turn every eligible conv -> BatchNorm (-> activation) chain of a model into a ResConv, in place."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from resconv_plugin.nn.resconv import Reason, ResConv, _check_gamma
from resconv_plugin.nn.block_gate import BlockGate
from resconv_plugin.fx.graph import ConvSite, find_conv_sites, find_residual_blocks
from resconv_plugin.fx.recipe import record_step
from resconv_plugin._utils import (
    ExampleInputs, as_input_tuple, check_module, eval_mode, format_table, run_example, set_submodule,
)
from resconv_plugin.timm_glue import split_norm_act
from resconv_plugin._checks import check_choice

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "SkippedConv"]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ConvertedLayer:
    """One conv that became a ResConv.

    Attributes:
        name: qualified name of the ResConv (the conv's old name), or of the gated residual block.
        norm: the BatchNorm involved: absorbed into the ResConv (its slot is now an ``nn.Identity`` or the norm's
            drop + act tail), or wrapped by the block's ``BlockGate``.
        in_channels, out_channels, kernel_size, groups, dilation: the conv's settings (for a block: its channel
            count, and empty kernel and dilation).
        flops: multiply-adds of the conv (of all convs in the block) on the example inputs (one multiply-add = 1).
        flops_share: ``flops`` over all conv + linear FLOPs of the model on the same inputs.
        kind: ``"layer"`` (ResConv) or ``"block"`` (BlockGate).
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
    kind: str = "layer"


@dataclass(frozen=True)
class SkippedConv:
    """A conv (or residual block, for ``level="block"``) that stayed as it was, and why.

    Attributes:
        name: the conv's (block's) qualified name.
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
        already_converted: names of the layers (blocks) of this level that were converted before this call.
        conv_linear_flops: all conv + linear FLOPs of the model on the example inputs (the share denominator).
    """

    converted: List[ConvertedLayer] = field(default_factory=list)
    skipped: List[SkippedConv] = field(default_factory=list)
    already_converted: List[str] = field(default_factory=list)
    conv_linear_flops: int = 0
    level: str = "layer"

    @property
    def converted_flops_share(self) -> float:
        """Share of the model's conv + linear FLOPs that now sits in ResConv blocks converted by this call."""
        return sum(layer.flops_share for layer in self.converted)

    def reason_counts(self) -> Dict[str, int]:
        """How many convs each kind of skip reason applies to, most frequent first."""
        counts = collections.Counter(kind for s in self.skipped for kind in s.kinds)
        return dict(counts.most_common())

    def __str__(self) -> str:
        what = "residual blocks to BlockGate" if self.level == "block" else "conv layers to ResConv"
        lines = [
            f"converted {len(self.converted)} {what} "
            f"({100 * self.converted_flops_share:.1f}% of conv+linear FLOPs), skipped {len(self.skipped)}"
            + (f", {len(self.already_converted)} already converted" if self.already_converted else "")
        ]
        if self.converted and self.level == "block":
            rows = [(c.name, c.norm, c.out_channels, f"{c.flops:,}", f"{100 * c.flops_share:.2f}%")
                    for c in self.converted]
            lines += ["", format_table(["block", "gated BatchNorm", "channels", "FLOPs", "share"], rows)]
        elif self.converted:
            rows = [(c.name, f"{c.in_channels}->{c.out_channels}", "x".join(map(str, c.kernel_size)), c.groups,
                     "x".join(map(str, c.dilation)), f"{c.flops:,}", f"{100 * c.flops_share:.2f}%")
                    for c in self.converted]
            lines += ["", format_table(["layer", "channels", "kernel", "groups", "dilation", "FLOPs", "share"], rows)]
        if self.skipped:
            lines += ["", format_table([f"skipped {'block' if self.level == 'block' else 'conv'}", "reason"],
                                       [(s.name, s.reason) for s in self.skipped])]
        return "\n".join(lines)


def _measure(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> Tuple[Dict[str, int], int, Set[str]]:
    """One eval-mode forward with hooks: per-conv FLOPs, total conv + linear FLOPs, names of modules that ran.

    The conv and linear counts are those of :func:`resconv_plugin.count_flops` for the same layers (one multiply-add
    = 1 flop; tests/test_convert.py); counting them with hooks instead of an fvcore trace keeps ``convert`` fast (an
    fvcore trace took 2 s for resnet18 at 64x64 and 7.7 s for resnet50 at 224x224 on 2 cores), and the report's
    share is of conv + linear FLOPs."""
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
    if report.level == "block" and not report.skipped:
        return (f"{type(model).__name__} has no residual block with an identity shortcut (an add of the block input "
                "and a branch computed inside the block): level='block' does not apply; try level='layer'.")
    subjects: Dict[str, List[str]] = collections.defaultdict(list)
    for skipped in report.skipped:
        for kind, subject in zip(skipped.kinds, skipped.subjects):
            if subject and subject not in subjects[kind]:
                subjects[kind].append(subject)
    top = "; ".join(
        f"{kind}: {n} convs" + (f" ({', '.join(subjects[kind][:3])})" if subjects[kind] else "")
        for kind, n in report.reason_counts().items()
    )
    if report.level == "block":
        return (f"{type(model).__name__} has no residual block that can be gated: 0 of {len(report.skipped)} "
                f"blocks with an identity shortcut qualify. Why not: {top}.")
    return (
        f"{type(model).__name__} has no conv layer that can become a ResConv: 0 of {len(report.skipped)} convs "
        "qualify. A conv qualifies when it keeps its channel count and spatial size (stride 1, odd kernel, 'same' "
        f"padding) and feeds a BatchNorm directly. Why not here: {top}."
    )


LEVELS = ("layer", "block", "auto")
#: ``level="auto"`` takes block gates when they reach at least this share of what layer gates reach (FLOPs).
BLOCK_REACH_FLOOR = 0.5


def _sites(model: nn.Module, level: str, called: Set[str]):
    """The candidate sites of ``level`` (eligible or not) and the names already converted at that level."""
    if level == "layer":
        return find_conv_sites(model, called)
    blocks = find_residual_blocks(model)
    return [b for b in blocks if not b.gated], [b.name for b in blocks if b.gated]


def _site_flops(site, level: str, flops: Dict[str, int]) -> int:
    """What removing ``site`` saves: the conv's FLOPs (``layer``), every conv's FLOPs inside the block (``block``)."""
    if level == "layer":
        return flops.get(site.name, 0)
    return sum(v for k, v in flops.items() if k.startswith(f"{site.name}."))


def _auto_level(model: nn.Module, called: Set[str], flops: Dict[str, int], modules: Dict[str, nn.Module],
                filter_fn: Optional[FilterFn]) -> str:
    """``level="auto"``: block gates wherever the model has residual blocks whose eligible gates sit on at least half
    the conv FLOPs that layer gates would (``BLOCK_REACH_FLOOR``); layer gates otherwise (plain nets, VGG).

    The measurements behind it (Fashion-MNIST, converged baselines, two seeds; benchmarks/results/):
    at equal CPU latency block gates kept more top-1 than layer gates at every target on cifar_resnet20 and
    cifar_resnet56 (cifar_resnet56 at 0.45 / 0.35 of the latency: 93.61 / 91.02% against 89.20 / 13.68%, where the
    layer-level plan removed both convs of many blocks and collapsed; equal_latency_summary.json), and at a 50%
    FLOPs budget on cifar_resnet20 (-1.95 pt against -2.06) and resnet18 (-0.14 against -0.30; ablation_depth*.md).
    Reach (share of conv + linear FLOPs that gates sit on, layer / block): cifar_resnet20 0.93 / 0.82, resnet18
    0.86 / 0.65, resnet50 0.37 / 0.64, efficientnet_b0 0.07 / 0.56: block everywhere there. A model converted
    before stays at the level it was converted at."""
    reach = {}
    for level in ("layer", "block"):
        sites, already = _sites(model, level, called)
        if already:  # converted before: stay at that level, so converting twice converts nothing new
            return level
        _apply_filter(sites, modules, filter_fn)
        reach[level] = sum(_site_flops(site, level, flops) for site in sites if site.eligible)
    return "block" if reach["block"] > 0 and reach["block"] >= BLOCK_REACH_FLOOR * reach["layer"] else "layer"


def convert(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    level: str = "layer",
    init_gamma: float = 1.0,
    filter_fn: Optional[FilterFn] = None,
) -> ConversionReport:
    """Give ``model`` trainable depth gates, in place: ResConv layers (``level="layer"``) or gated blocks (``"block"``).

    ``level="layer"`` (the paper's method): every eligible conv -> BatchNorm (-> activation) chain becomes a
    :class:`ResConv`, ``gamma * bn(conv(x)) + (1 - gamma) * x``. A conv is eligible when it has
    ``in_channels == out_channels``, stride 1, odd kernel sizes and 'same' padding (any groups, depthwise included,
    any dilation), is called once, and its output goes only to a BatchNorm with running statistics. The BatchNorm's
    slot becomes ``nn.Identity`` (or, for timm's ``BatchNormAct2d``, its drop + activation tail), so the identity term
    is added before the activation.

    ``level="block"``: every residual block ``[act](x + F(x))`` with an identity shortcut whose branch ends in a
    BatchNorm gets a :class:`BlockGate` on that BatchNorm: ``[act](x + gamma * F(x))``. This reaches blocks whose
    inner convs change width (Bottleneck ResNets, inverted residuals, RegNet). Both levels can be applied to one
    model (block first, then layer: the convs ending a gated branch are then not converted).

    With the default ``init_gamma=1`` the model computes exactly what it computed before. Chains are found by
    torch.fx tracing (convs, norms and timm's notrace modules as leaves), FLOPs by one eval-mode forward of
    ``example_inputs`` under ``torch.no_grad`` (BatchNorm statistics untouched). Converting twice converts nothing
    new.

    Args:
        model: any CNN, typically from ``timm.create_model``.
        example_inputs: a tensor (or tuple of tensors) the model accepts, e.g. ``torch.randn(1, 3, 224, 224)``.
        level: ``"layer"``, ``"block"``, or ``"auto"``: block gates where the model has residual blocks with
            identity shortcuts (ResNets, RegNet, EfficientNet, MobileNet: block gates kept more accuracy than layer
            gates at every budget measured), layer gates otherwise (plain nets, VGG); ``report.level`` says which
            was chosen, and the recipe records it.
        init_gamma: initial gate value in [0, 1] for every new gate.
        filter_fn: optional ``filter_fn(module, name) -> bool`` (the conv, or the block); only what it returns True
            for is converted.

    Returns:
        A :class:`ConversionReport` listing converted layers (blocks) and every skipped one with its reason.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, bad ``example_inputs`` type, ``filter_fn`` not callable or not
            returning a bool.
        ValueError: the model cannot run on ``example_inputs``, cannot be traced, ``init_gamma`` is outside [0, 1],
            ``level`` is unknown, or the model has nothing eligible (the message says why, per reason).

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
    check_choice("level", level, LEVELS)
    flops, conv_linear_flops, called = _measure(model, inputs)
    modules = dict(model.named_modules())
    if level == "auto":
        level = _auto_level(model, called, flops, modules, filter_fn)
    sites, already = _sites(model, level, called)
    _apply_filter(sites, modules, filter_fn)

    report = ConversionReport(already_converted=already, conv_linear_flops=conv_linear_flops, level=level)
    report.skipped = [
        SkippedConv(s.name, "; ".join(r.text for r in s.reasons), tuple(r.kind for r in s.reasons),
                    tuple(r.subject for r in s.reasons))
        for s in sites if not s.eligible
    ]
    eligible = [s for s in sites if s.eligible]
    if not eligible and not already:
        raise ValueError(_no_eligible_message(model, report))

    for site in eligible:
        report.converted.append(_convert_site(model, modules, site, level, init_gamma, flops, conv_linear_flops))
    if eligible:
        record_step(model, "convert", level=level, names=[s.name for s in eligible], init_gamma=init_gamma,
                    input_shapes=[list(t.shape) for t in inputs])
    return report


def _convert_site(model: nn.Module, modules: Dict[str, nn.Module], site, level: str, init_gamma: float,
                  flops: Dict[str, int], total: int) -> ConvertedLayer:
    norm = modules[site.norm]
    if level == "block":
        gate = BlockGate(norm, init_gamma)
        gate.train(norm.training)
        set_submodule(model, site.norm, gate)
        n = _site_flops(site, level, flops)
        return ConvertedLayer(name=site.name, norm=site.norm, in_channels=norm.num_features,
                              out_channels=norm.num_features, kernel_size=(), groups=1, dilation=(), flops=n,
                              flops_share=n / total if total else 0.0, kind="block")
    conv = modules[site.name]
    bn, tail = split_norm_act(norm)
    block = ResConv(conv, bn, init_gamma)
    block.train(conv.training)
    set_submodule(model, site.name, block)
    set_submodule(model, site.norm, tail)
    n = _site_flops(site, level, flops)
    return ConvertedLayer(
        name=site.name, norm=site.norm, in_channels=conv.in_channels, out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size), groups=conv.groups, dilation=tuple(conv.dilation),
        flops=n, flops_share=n / total if total else 0.0,
    )
