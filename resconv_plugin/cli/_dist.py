"""Process-group helpers: the command runs as one process, or under ``torchrun`` (DistributedDataParallel, gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "init_distributed"]


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (1 when not distributed)."""

    rank: int = 0
    world: int = 1

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
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())
