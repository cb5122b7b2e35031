"""Latency measured on this machine: median wall time of repeated runs after a warm-up.

On a GPU the clock waits for the device: every timed run is bracketed by ``torch.cuda.synchronize(device)`` of the
device that runs it (``device=``; without one, of the current CUDA device when CUDA has been initialised in this
process), so queued kernels are counted, not just their launch.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["median_latency", "module_latencies", "interleaved_latencies"]

Device = Union[str, torch.device, None]


def _sync(device: Optional[torch.device]) -> None:
    if device is None:  # not said: the current CUDA device, if this process uses CUDA
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":  # the device that runs the timed work, whichever is current
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def median_latency(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, *, device: Device = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs that are not timed.

    Args:
        device: where ``fn`` runs; a CUDA device is synchronised around every timed run (default: the current
            CUDA device when CUDA is initialised).
    """
    device = torch.device(device) if device is not None else None
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


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
        result[key] = median_latency(lambda: [m(x) for m, x in calls], repeats=repeats, device=inputs[0].device)
    return result


@torch.no_grad()
def interleaved_latencies(fns: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3, *,
                          device: Device = None) -> Dict[str, float]:
    """Median seconds of each function, timed in turns (A, B, C, A, B, C, ...) so that a slow spell of a shared
    machine hits all of them alike; the order of each round rotates. ``device``: as :func:`median_latency`."""
    device = torch.device(device) if device is not None else None
    keys = list(fns)
    for _ in range(warmup):
        for key in keys:
            fns[key]()
    times: Dict[str, list] = {key: [] for key in keys}
    for r in range(repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(_timed(fns[key], device))
    return {key: statistics.median(values) for key, values in times.items()}
