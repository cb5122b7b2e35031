"""DistributedDataParallel on CPU (gloo, 2 processes): gradients, BatchNorm statistics and the LayerPruner's
regulariser give what one process gives on the same global batch (float64, so round-off cannot hide a bug)."""

from __future__ import annotations

import os
import socket

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import resconv_plugin
from resconv_plugin.workflow.syncbn import GlobalBatchNorm2d, global_batchnorm


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (64,), generator=g)


def _model():
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", num_classes=10, in_chans=1).double()
    resconv_plugin.convert(model, torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    return model.train()


def _train(model, steps: int, rank: int = 0, world: int = 1):
    """SGD + momentum with the LayerPruner (40% FLOPs budget, proximal) for ``steps`` steps; returns the model."""
    x, y = _batch()
    share = len(x) // world
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = resconv_plugin.LayerPruner(model, torch.zeros(1, 1, 28, 28, dtype=torch.float64), reg=0.5,
                                        flops_reduction=0.4, sparsity_steps=steps, optimizer=optimizer)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(net(x[rank * share:(rank + 1) * share]),
                                                 y[rank * share:(rank + 1) * share])
        optimizer.zero_grad()
        loss.backward()
        pruner.regularize(net)
        optimizer.step()
    return model


def _worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        with global_batchnorm(model):
            assert sum(isinstance(m, GlobalBatchNorm2d) for m in model.modules()) == 21
            _train(model, steps, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    steps = 12
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), out, steps), nprocs=2)
    reference = _train(_model(), steps).state_dict()
    ddp = torch.load(out)
    gammas = [k for k in reference if k.endswith("gamma")]
    assert len(gammas) == 16
    zero = [k for k in gammas if reference[k].item() == 0.0]
    assert zero, "the budget drove some gates to exactly 0"
    assert [k for k in gammas if ddp[k].item() == 0.0] == zero
    for key, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp[key], value, rtol=1e-9, atol=1e-11, msg=key)
        else:
            assert torch.equal(ddp[key], value), key


def test_global_batchnorm_is_plain_batchnorm_alone():
    """Outside a process group (or in eval), GlobalBatchNorm2d is nn.BatchNorm2d; the swap is undone after."""
    bn = torch.nn.BatchNorm2d(4)
    with global_batchnorm(bn):
        assert type(bn) is GlobalBatchNorm2d
        x = torch.randn(8, 4, 5, 5)
        torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    assert type(bn) is torch.nn.BatchNorm2d
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_run_on_main_measures_once_and_every_rank_raises_its_error():
    """Dist.run_on_main: rank 0 runs the function and every rank gets its result; when it raises, every rank
    raises the same error (no rank is left waiting in a collective); the other ranks never run it."""
    import pytest

    from helpers import RecordedDist
    from resconv_plugin.workflow import ConfigError

    main = RecordedDist(rank=0)
    assert main.run_on_main(lambda: {"ratio": 0.25}) == {"ratio": 0.25}

    def unreachable():
        raise ConfigError("latency_reduction=0.9 is unreachable")

    with pytest.raises(ConfigError, match="unreachable"):
        main.run_on_main(unreachable)
    other = RecordedDist(rank=1, replies=main.sent)

    def never():
        raise AssertionError("only rank 0 runs it")

    assert other.run_on_main(never) == {"ratio": 0.25}
    with pytest.raises(ConfigError, match="latency_reduction=0.9 is unreachable"):
        other.run_on_main(never)


def test_broadcast_refuses_tensors_and_modules():
    """A pickled CUDA tensor unpickles onto rank 0's GPU in every process: the broadcast carries plans."""
    import pytest

    from resconv_plugin.workflow import Dist

    for obj in (torch.zeros(2), torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="not a (Tensor|Linear)"):
            Dist().broadcast(obj)
    assert Dist().broadcast({"ratio": 0.5}) == {"ratio": 0.5}


def test_the_process_group_outwaits_rank_0_alone(monkeypatch):
    """Rank 0 evaluates, records and measures while the others wait in a collective: the group's timeout is
    PROCESS_GROUP_TIMEOUT (2 hours), not NCCL's 10-minute watchdog."""
    from resconv_plugin.workflow import distributed

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: joined.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    threads = torch.get_num_threads()
    try:
        run = distributed.init_distributed("cpu")
    finally:
        torch.set_num_threads(threads)
    assert (run.rank, run.world) == (1, 2)
    assert joined == {"backend": "gloo", "timeout": distributed.PROCESS_GROUP_TIMEOUT}
    assert distributed.PROCESS_GROUP_TIMEOUT.total_seconds() == 2 * 3600
