"""Process-group helpers: the command runs as one process, or under ``torchrun`` (DistributedDataParallel: NCCL on
CUDA, one GPU per process by ``LOCAL_RANK``; gloo on CPU)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from resconv_plugin.workflow.config import ConfigError

__all__ = ["Dist", "init_distributed", "resolve_device", "PROCESS_GROUP_TIMEOUT"]

T = TypeVar("T")

#: How long a process waits in a collective for the others. Rank 0 works alone while the others wait: evaluation,
#: the stage records, the latency tables and the joint plan (measured on one clock, :meth:`Dist.run_on_main`); NCCL's
#: default watchdog (10 minutes) would abort a run on a large validation set or a slow plan.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


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
        """Rank 0's ``obj`` on every rank: a picklable object without tensors (names, numbers, plans). A pickled
        tensor unpickles onto the device it had in rank 0: a model from rank 0 would land on rank 0's GPU in every
        process. Broadcast what rebuilds it instead (a plan, a ratio), or a state dict moved to the CPU.

        Raises:
            TypeError: ``obj`` is a tensor or a module.
        """
        if isinstance(obj, (torch.Tensor, torch.nn.Module)):
            raise TypeError(f"Dist.broadcast takes plain picklable objects, not a {type(obj).__name__} (it would "
                            "unpickle onto rank 0's device in every process): broadcast how to rebuild it")
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 only, its result broadcast to every rank; an exception it raises is raised on every
        rank (so no process waits in a collective for one that failed).

        For what must be measured on one clock (latency tables, the joint plan) or decided once. The result must
        be picklable and hold no tensors (they would unpickle onto rank 0's GPU in every process): names, numbers.

        Example:
            >>> Dist().run_on_main(lambda: 42)
            42
        """
        if not self.enabled:
            return fn()
        result, error, sent = None, None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # every rank raises it, after the broadcast
                error = sent = exc
                try:
                    pickle.dumps(exc)
                except Exception:  # an exception that does not pickle: its type and message
                    sent = RuntimeError(f"{type(exc).__name__}: {exc}")
        result, raised = self.broadcast((result, sent))
        if error is not None:
            raise error  # rank 0: the original exception, with its traceback
        if raised is not None:
            raise raised
        return result

    def all_sum(self, *values: float) -> list:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str = "auto", option: str = "--device") -> torch.device:
    """``"auto"``: CUDA when available (as timm's train.py), else the CPU; otherwise the named device, checked
    (a CUDA index must name one of this machine's GPUs). ``option``: the setting named in the error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"{option} {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                         f"use {option} cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"{option} {device}: this machine has {count} GPU{'s' if count != 1 else ''} "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return resolved


def init_distributed(device: str = "auto", timeout: timedelta = PROCESS_GROUP_TIMEOUT) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment, or run alone.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and the group uses NCCL; on the CPU, gloo (and the
    cores are shared out among the processes). A single process on a named GPU (``cuda:1``) makes it the current
    device, so that synchronisation, pinned copies and CUDA contexts go to that GPU, not to GPU 0.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (:func:`resolve_device`).
        timeout: how long a process waits in a collective (:data:`PROCESS_GROUP_TIMEOUT`).
    """
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if resolved.type == "cuda" and resolved.index is not None:
            torch.cuda.set_device(resolved)
        return Dist(device=resolved)
    cuda = resolved.type == "cuda"
    if cuda:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=resolved)
