"""Test helpers: errors relative to the output scale, the dataset check, a recording stand-in for ``Dist``; the
randomised BatchNorm statistics and gates (default BN statistics hide folding bugs) come from
:mod:`resconv_plugin.testing`."""

from __future__ import annotations

import torch
from torch import nn

from resconv_plugin.testing import randomize_bn, randomize_gates  # noqa: F401  (the tests import them from here)
from resconv_plugin.workflow.distributed import Dist


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error relative to the output scale (max |expected|)."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def require_fashion_mnist():
    """Skip a test when Fashion-MNIST is not installed, except in CI (CI=true), where that is a failure."""
    import os

    import pytest

    from resconv_plugin.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(str(exc))



class RecordedDist(Dist):
    """Rank ``rank`` of a 2-process run without a process group (a ``Dist`` whose collectives are recorded): what
    rank 0 broadcasts is kept in ``sent``; another rank receives ``replies`` (what rank 0 sent), in order."""

    def __init__(self, rank: int = 0, replies=None, device: torch.device = torch.device("cpu")) -> None:
        super().__init__(rank=rank, world=2, device=device)
        self.sent, self.replies = [], list(replies or [])

    def barrier(self) -> None:
        pass

    def broadcast(self, obj):
        if self.main:
            self.sent.append(obj)
            return obj
        return self.replies.pop(0)

    def all_sum(self, *values: float) -> list:
        return list(values)

def holds_tensors(obj) -> bool:
    """Whether ``obj`` (nested containers, dataclasses, objects) holds a tensor or a module anywhere."""
    import dataclasses

    if isinstance(obj, (torch.Tensor, nn.Module)):
        return True
    if isinstance(obj, dict):
        return any(holds_tensors(k) or holds_tensors(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(holds_tensors(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(holds_tensors(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, BaseException):
        return holds_tensors(obj.args)
    return hasattr(obj, "__dict__") and not isinstance(obj, type) and holds_tensors(vars(obj))
