"""Latency measured on this machine: median wall time of repeated runs after a warm-up.

On a GPU the clock waits for the device: every timed run is bracketed by ``torch.cuda.synchronize()`` (when CUDA has
been initialised in this process), so queued kernels are counted, not just their launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import nn

__all__ = ["median_latency", "module_latencies", "interleaved_latencies"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


@torch.no_grad()
def median_latency(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs that are not timed."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


@torch.no_grad()
def module_latencies(model: nn.Module, inputs: Tuple[torch.Tensor, ...], groups: Dict[str, Iterable[str]],
                     repeats: int = 20) -> Dict[str, float]:
    """Median seconds of each group of submodules run alone on the inputs they get in ``model(*inputs)``.

    ``groups`` maps a key to module names run one after the other (e.g. a conv and the activation after it).
    """
    names = {n for group in groups.values() for n in group}
    captured: Dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: captured.__setitem__(n, args[0].clone())) for n in names]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for key, group in groups.items():
        calls = [(model.get_submodule(n), captured[n]) for n in group if n in captured]
        result[key] = median_latency(lambda: [m(x) for m, x in calls], repeats=repeats)
    return result


@torch.no_grad()
def interleaved_latencies(fns: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> Dict[str, float]:
    """Median seconds of each function, timed in turns (A, B, C, A, B, C, ...) so that a slow spell of a shared
    machine hits all of them alike; the order of each round rotates."""
    keys = list(fns)
    for _ in range(warmup):
        for key in keys:
            fns[key]()
    times: Dict[str, list] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(_timed(fns[key]))
    return {key: statistics.median(values) for key, values in times.items()}
