"""The channel-ratio bisection: the one search, for the pipeline, the joint planner and the benchmarks, of the
torch-pruning ``pruning_ratio`` whose pruned model meets a cost target.

Cost is what the caller measures (FLOPs, or latency relative to a baseline). Latency is noisy: near the target
one timing off by 0.05 moves a bisection by 0.1-0.2 of ratio where the cost falls slowly with the ratio (measured
on cifar_resnet20 after depth pruning: the re-bisection after training landed at ratio 0.475 where the plan needed
0.238, and the model at 0.37 of the latency for a 0.45 budget). So every try is measured ``confirm`` times and read
at the median: one outlier among three readings cannot steer the search (reading only the tries near the band
again is not enough: an outlier far from it sends the bisection the wrong way before any near try is made).

Example:
    >>> import torch
    >>> prune = lambda ratio: torch.nn.Linear(1, 1).requires_grad_(False).apply(lambda m: setattr(m, "r", ratio))
    >>> cost = lambda model: 1.0 - 0.8 * model.r  # a deterministic cost (FLOPs-like): confirm=1
    >>> search = bisect_ratio(prune, cost, target=0.6, tolerance=0.02, confirm=1)
    >>> search.met, 0.58 <= search.cost_rel <= 0.6
    (True, True)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

from torch import nn

from resconv_plugin._checks import Interval, check_int, check_number

__all__ = ["RatioSearch", "bisect_ratio"]


@dataclass
class RatioSearch:
    """The outcome of :func:`bisect_ratio`.

    Attributes:
        model: the pruned model chosen (the unpruned one when ratio 0 already meets the target).
        ratio: its pruning ratio.
        cost_rel: its cost (the median of its measurements).
        met: whether ``cost_rel <= target``.
        tries: every try as ``(ratio, cost_rel, measurements)``, in order.
    """

    model: nn.Module
    ratio: float
    cost_rel: float
    met: bool
    tries: List[Tuple[float, float, int]] = field(default_factory=list)


def bisect_ratio(prune: Callable[[float], nn.Module], cost: Callable[[nn.Module], float], target: float, *,
                 tolerance: float = 0.02, max_ratio: float = 0.95, iterations: int = 12,
                 confirm: int = 3) -> RatioSearch:
    """Bisect the pruning ratio in ``[0, max_ratio]`` until ``cost(prune(ratio))`` lies in
    ``[target - tolerance, target]``.

    Ratio 0 (``prune(0.0)``) is tried first: a model that already meets the target is returned unpruned. Each
    later try halves the interval (more pruning while the cost is above ``target``, less while it is below the
    band). Each try is measured ``confirm`` times and its median decides.

    Args:
        prune: ``prune(ratio) -> model``, a new pruned copy for each ratio.
        cost: ``cost(model) -> float``, relative to the unpruned baseline (what ``target`` is in).
        target: the cost to reach.
        tolerance: the width of the band below ``target`` that ends the search.
        max_ratio: the largest ratio tried.
        iterations: the most tries after ratio 0.
        confirm: measurements of each try (1 for a deterministic cost such as FLOPs).

    Returns:
        The in-band try of the highest cost; without one, the try of the highest cost at or below ``target``;
        without any (nothing up to ``max_ratio`` meets it), the cheapest try with ``met=False``.

    Raises:
        ValueError: a bad ``target``, ``tolerance``, ``max_ratio``, ``iterations`` or ``confirm``.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
        raise ValueError(f"target must be a positive cost, got {target!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < target:
        raise ValueError(f"tolerance must be in (0, target={target}), got {tolerance!r}")
    check_number("max_ratio", max_ratio, Interval(0, 1, low_open=True, high_open=True))
    check_int("iterations", iterations, 1)
    check_int("confirm", confirm, 1)
    floor = target - tolerance

    kept: List[Tuple[nn.Module, float, float]] = []  # (model, ratio, median cost) of every try, in order

    def attempt(ratio: float) -> float:
        model = prune(ratio)
        kept.append((model, ratio, statistics.median(cost(model) for _ in range(confirm))))
        return kept[-1][2]

    if attempt(0.0) <= target:
        return RatioSearch(*kept[0], True, _tries(kept, confirm))
    lo, hi = 0.0, float(max_ratio)
    for _ in range(iterations):
        ratio = (lo + hi) / 2
        value = attempt(ratio)
        if floor <= value <= target:
            break
        lo, hi = (ratio, hi) if value > target else (lo, ratio)
    feasible = [k for k in kept if k[2] <= target]
    if feasible:
        return RatioSearch(*max(feasible, key=lambda k: (k[2], -k[1])), True, _tries(kept, confirm))
    return RatioSearch(*min(kept, key=lambda k: (k[2], k[1])), False, _tries(kept, confirm))


def _tries(kept: List[Tuple[nn.Module, float, float]], confirm: int) -> List[Tuple[float, float, int]]:
    return [(ratio, value, confirm) for _, ratio, value in kept]
