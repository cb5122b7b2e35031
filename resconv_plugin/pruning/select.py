"""Choosing which gates to remove under a budget: pure functions of scores, savings and the target.

The problem: pick the set of gates whose removal saves at least ``target`` (FLOPs or seconds) while removing the
least importance, i.e. a covering knapsack: minimise ``sum(score)`` subject to ``sum(saving) >= target``.

* :func:`select_within_budget` with ``method="dp"`` (the default) solves it exactly by dynamic programming over the
  savings rounded *down* to ``target / resolution`` (so a set the DP accepts always meets the real target; a gate
  saving less than one unit cannot help the DP). Scores are assumed additive: the importance of a set is the sum of
  its gates' importances. Why DP and not greedy: ranking by importance per unit of saving and filling the budget can
  overshoot with a costly last gate where two cheaper ones would have done (a test shows such a case); the DP costs
  milliseconds for a few hundred gates.
* ``method="greedy"``: rank by score per unit of saving, fill the budget, then drop every chosen gate that is no
  longer needed (most important first). Used automatically when gates are nested (a gated block holding gated
  layers: their savings are not additive) or when the rounded DP finds no solution.
* :func:`select_iteratively`: the greedy with re-measurement. After each chosen gate the scores of the rest are
  measured again with the chosen ones removed (interactions between removals are seen; the DP cannot do that).
* :class:`BudgetChooser`: one ranking of a pruner: a criterion's scores and a cost table, asked for the set of
  several goals (the latency fit asks for a few), with an iterative criterion measured once per removed set.

Ties (equal score per saving) go to the gate that saves more, then to module order. Scores below 0 (removing the
gate helped) count as 0.

Example:
    >>> select_within_budget({"a": 3.0, "b": 1.0, "c": 1.2}, {"a": 10.0, "b": 6.0, "c": 4.0}, target=10.0)
    ['b', 'c']
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from resconv_plugin._checks import check_int

__all__ = ["select_within_budget", "select_iteratively", "select_count", "set_saving", "BudgetChooser", "METHODS"]

METHODS = ("dp", "greedy")


def _check(scores: Mapping[str, float], savings: Mapping[str, float], target: float) -> None:
    missing = [n for n in scores if n not in savings]
    if missing:
        raise ValueError(f"no saving given for {missing[:5]}")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target) or target < 0:
        raise ValueError(f"target must be a finite number >= 0, got {target!r}")


def _inside(name: str, block: str) -> bool:
    return name.startswith(f"{block}.")


def _nested(names: Sequence[str]) -> bool:
    return any(_inside(a, b) for a in names for b in names if a != b)


def _ratio_key(score: float, saving: float, rank: int):
    return (max(score, 0.0) / saving if saving > 0 else math.inf, -saving, rank)


def _net_saving(name: str, chosen: Sequence[str], savings: Mapping[str, float]) -> float:
    """What adding ``name`` to ``chosen`` saves: a block counts once, minus its layers already chosen."""
    return savings[name] - sum(savings[c] for c in chosen if _inside(c, name))


def _add(name: str, chosen: List[str]) -> None:
    chosen[:] = [c for c in chosen if not _inside(c, name)] + [name]


def _total(chosen: Sequence[str], savings: Mapping[str, float]) -> float:
    return sum(savings[c] for c in chosen)


def _short(total: float, target: float) -> bool:
    """``total`` misses ``target`` by more than rounding: the same savings summed in another order differ in the
    last bits, so a goal equal to the total of every gate (a budget at the reachable maximum) must count as met."""
    return total < target - 1e-9 * abs(target)


def set_saving(savings: Mapping[str, float], names: Iterable[str]) -> float:
    """What removing ``names`` together saves: the sum of their positive savings, a layer inside a block of
    ``names`` counted with the block, not twice (also the largest reachable saving when ``names`` is every gate).

    Example:
        >>> set_saving({"blk": 10.0, "blk.l1": 4.0, "other": 3.0}, ["blk", "blk.l1", "other"])
        13.0
    """
    names = list(names)
    return sum(savings[n] for n in names if savings[n] > 0 and not any(_inside(n, b) for b in names))


def _drop_unneeded(chosen: List[str], scores: Mapping[str, float], savings: Mapping[str, float],
                   target: float) -> List[str]:
    for name in sorted(chosen, key=lambda n: -max(scores[n], 0.0)):
        if not _short(_total(chosen, savings) - savings[name], target):
            chosen.remove(name)
    return chosen


def _greedy(scores: Mapping[str, float], savings: Mapping[str, float], target: float,
            rank: Mapping[str, int]) -> List[str]:
    chosen: List[str] = []
    for name in sorted(scores, key=lambda n: _ratio_key(scores[n], savings[n], rank[n])):
        if not _short(_total(chosen, savings), target):
            break
        if savings[name] <= 0 or any(_inside(name, c) for c in chosen):
            continue
        _add(name, chosen)
    return _drop_unneeded(chosen, scores, savings, target)


def _dp(scores: Mapping[str, float], savings: Mapping[str, float], target: float, rank: Mapping[str, int],
        resolution: int) -> Optional[List[str]]:
    names = sorted(scores, key=lambda n: rank[n])
    unit = target / resolution
    weights = [min(resolution, int(math.floor(savings[n] / unit))) for n in names]
    scale = max([abs(scores[n]) for n in names] + [1e-12])
    # tiny tie-breakers: among equal totals prefer larger savings, then module order
    by_preference = sorted(range(len(names)), key=lambda i: (-savings[names[i]], rank[names[i]]))
    tie = {i: scale * 1e-9 * (k + 1) for k, i in enumerate(by_preference)}
    dp = np.full(resolution + 1, np.inf)
    dp[0] = 0.0
    keep = []
    for i, name in enumerate(names):
        w = weights[i]
        if w <= 0:
            keep.append(None)
            continue
        shifted = np.concatenate([np.full(min(w, resolution + 1), dp[0]), dp[:max(resolution + 1 - w, 0)]])
        candidate = shifted + max(scores[name], 0.0) + tie[i]
        better = candidate < dp
        dp = np.where(better, candidate, dp)
        keep.append(better)
    if not math.isfinite(dp[resolution]):
        return None
    chosen, j = [], resolution
    for i in range(len(names) - 1, -1, -1):
        if keep[i] is not None and keep[i][j]:
            chosen.append(names[i])
            j = max(0, j - weights[i])
    return sorted(chosen, key=lambda n: _ratio_key(scores[n], savings[n], rank[n]))


def select_within_budget(scores: Mapping[str, float], savings: Mapping[str, float], target: float, *,
                         order: Optional[Sequence[str]] = None, method: str = "dp",
                         resolution: int = 2000) -> List[str]:
    """The gates to remove: at least ``target`` saved, least total score removed.

    Args:
        scores: ``{name: importance}`` of the candidate gates (higher = more important).
        savings: ``{name: what removing it saves}`` (FLOPs or seconds), for every candidate.
        target: the saving to reach, in the units of ``savings``.
        order: module order, for ties (default: the order of ``scores``).
        method: ``"dp"`` (exact for additive scores) or ``"greedy"`` (importance per saving, then drop the
            unneeded); nested gates always use the greedy.
        resolution: DP units per ``target``.

    Returns:
        The chosen names, cheapest score per saving first. Empty when ``target`` is 0.

    Raises:
        ValueError: the candidates cannot reach ``target`` together, an unknown method, a missing saving.
    """
    _check(scores, savings, target)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if target <= 0:
        return []
    rank = {n: i for i, n in enumerate(order or list(scores))}
    rank.update({n: len(rank) + i for i, n in enumerate(n for n in scores if n not in rank)})
    names = list(scores)
    reachable = set_saving(savings, names)
    if _short(reachable, target):
        raise ValueError(f"the {len(names)} candidate gates save at most {reachable:.6g}, less than the target "
                         f"{target:.6g}")
    if method == "dp" and not _nested(names):
        chosen = _dp(scores, savings, target, rank, resolution)
        if chosen is not None:
            return chosen
    return _greedy(scores, savings, target, rank)


def select_iteratively(score_fn: Callable[[List[str]], Dict[str, float]], savings: Mapping[str, float],
                       target: float, *, order: Sequence[str]) -> List[str]:
    """Greedy with re-measurement: ``score_fn(chosen)`` scores every gate given that ``chosen`` are removed.

    Each round takes the gate with the smallest score per unit of (net) saving, until ``target`` is met; a final
    pass drops gates that are no longer needed (with their last measured scores).

    Args:
        score_fn: ``chosen -> {name: score}`` for the gates still available.
        savings: ``{name: saving}`` of every gate in ``order``.
        target: the saving to reach.
        order: every candidate, in module order.
    """
    _check({n: 0.0 for n in order}, savings, target)
    rank = {n: i for i, n in enumerate(order)}
    chosen: List[str] = []
    last: Dict[str, float] = {}
    while _short(_total(chosen, savings), target):
        available = [n for n in order if n not in chosen and not any(_inside(n, c) for c in chosen)
                     and _net_saving(n, chosen, savings) > 0]
        if not available:
            raise ValueError(f"the {len(order)} candidate gates save at most {_total(chosen, savings):.6g}, less "
                             f"than the target {target:.6g}")
        scores = score_fn(list(chosen))
        best = min(available, key=lambda n: _ratio_key(scores[n], _net_saving(n, chosen, savings), rank[n]))
        last[best] = scores[best]
        _add(best, chosen)
    return _drop_unneeded(chosen, last, savings, target)


def select_count(scores: Mapping[str, float], count: int, savings: Optional[Mapping[str, float]] = None, *,
                 order: Optional[Sequence[str]] = None) -> List[str]:
    """The ``count`` gates of lowest score (ties: larger saving, then module order)."""
    check_int("count", count)
    rank = {n: i for i, n in enumerate(order or list(scores))}
    savings = savings or {}
    ranked = sorted(scores, key=lambda n: (scores[n], -savings.get(n, 0.0), rank.get(n, len(rank))))
    return ranked[:count]


class BudgetChooser:
    """The sets one ranking chooses: ``chooser(goal)`` = the least important gates that save ``goal``.

    Non-iterative criteria are scored once, as the chooser is built, and chosen by :func:`select_within_budget`;
    an iterative one (``iterative=True``) by :func:`select_iteratively`, each set of removed gates scored once
    however many goals are asked. ``chooser(goal, extra)`` adds the ``extra`` least important of the other gates
    (scored with the chosen set removed; ties in module order): the latency fit's last resort when the table's whole
    saving measures short (:func:`~resconv_plugin.pruning.latency_fit.fit_latency_goal`).

    Args:
        score_fn: ``removed -> {name: score}``: the criterion, with the gates of ``removed`` taken as gone.
        savings: ``{name: saving}`` of every candidate.
        candidates: the gates that may go, in module order.
        order: every gate in module order (ties), the ignored ones included.
        iterative: re-measure the scores after each chosen gate.
        method: ``"dp"`` or ``"greedy"`` (:func:`select_within_budget`).

    Example:
        >>> scores = {"a": 3.0, "b": 1.0, "c": 1.2}
        >>> choose = BudgetChooser(lambda removed: scores, {"a": 10.0, "b": 6.0, "c": 4.0}, candidates=list(scores))
        >>> choose(10.0), choose(6.0, extra=1)
        (['b', 'c'], ['b', 'c'])
    """

    def __init__(self, score_fn: Callable[[Sequence[str]], Dict[str, float]], savings: Mapping[str, float], *,
                 candidates: Sequence[str], order: Optional[Sequence[str]] = None, iterative: bool = False,
                 method: str = "dp") -> None:
        self.score_fn, self.savings, self.iterative, self.method = score_fn, savings, iterative, method
        self.candidates, self.order = list(candidates), list(order if order is not None else candidates)
        self._memo: Dict[Tuple[str, ...], Dict[str, float]] = {}  # the model does not change within one ranking
        self._ranked_rest: Dict[Tuple[str, ...], List[str]] = {}  # a set extended several times: scored once
        self._scores = None if iterative else score_fn(())

    def _remembered(self, removed: Sequence[str] = ()) -> Dict[str, float]:
        key = tuple(sorted(removed))
        if key not in self._memo:
            self._memo[key] = self.score_fn(removed)
        return self._memo[key]

    def __call__(self, goal: float, extra: int = 0) -> List[str]:
        if self.iterative:
            chosen = select_iteratively(self._remembered, self.savings, goal, order=self.candidates)
        else:
            chosen = select_within_budget(self._scores, self.savings, goal, order=self.order, method=self.method)
        if extra <= 0:
            return chosen
        taken = set(chosen)
        rest = [n for n in self.candidates if n not in taken]
        if extra >= len(rest):  # all of them: no order needed
            return chosen + rest
        key = tuple(chosen)
        if key not in self._ranked_rest:
            scores = self.score_fn(chosen)
            self._ranked_rest[key] = sorted(rest, key=lambda n: scores.get(n, 0.0))
        return chosen + self._ranked_rest[key][:extra]
