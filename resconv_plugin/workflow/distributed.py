"""Process-group helpers: the command runs as one process, or under ``torchrun`` (DistributedDataParallel: NCCL on
CUDA, one GPU per process by ``LOCAL_RANK``; gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from resconv_plugin.workflow.config import ConfigError

__all__ = ["Dist", "init_distributed", "resolve_device"]


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (1 when not distributed)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, *values: float) -> list:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available (as timm's train.py), else the CPU; otherwise the named device, checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    return resolved


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and the group uses NCCL; on the CPU, gloo (and the
    cores are shared out among the processes).
    """
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolved)
    cuda = resolved.type == "cuda"
    if cuda:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=resolved)
