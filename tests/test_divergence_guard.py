"""train_stage's divergence guard: a blown-up loss restarts the stage from where it began, first with a warm-up at the
same rate, then at half the rate."""

import copy
from dataclasses import replace as dataclasses_replace
import math

import pytest
import torch
from torch import nn

from test_device import synthetic
from resconv_plugin.workflow.report import write_report
from resconv_plugin.workflow.training import StageSettings, TrainingDiverged, train_stage


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def run(lr: float, epochs: int = 2, model: nn.Module = None, batch_size: int = 32, **kwargs):
    """(model, progress) after a stage on 512 random images with random labels (weight decay 0: a linear model whose
    loss blows up above lr ~0.1 and stays near ln 10 below 0.05)."""
    model = model if model is not None else linear_model()
    settings = StageSettings(name="t", epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=0.0, progress=False,
                             **{k: v for k, v in kwargs.items() if k not in ("resume", "on_epoch_end")})
    progress = train_stage(model, synthetic(512), settings, resume=kwargs.get("resume"),
                           on_epoch_end=kwargs.get("on_epoch_end"))
    return model, progress


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y)


def test_blow_up_restarts_with_a_warm_up_then_at_half_the_rate_and_matches_a_fresh_run_at_the_end_settings():
    model, progress = run(0.2, batch_size=16)  # 32 updates an epoch: the check of the loss's level is on
    # first the same rate with a one-epoch warm-up; it still blew up (in the warm-up or the epoch after): halved
    assert [(r["lr"], r["new_lr"], r["warmup_epochs"], r["new_warmup_epochs"]) for r in progress.restarts] == [
        (0.2, 0.2, 0, 1), (0.2, 0.1, 1, 1), (0.1, 0.05, 1, 1), (0.05, 0.025, 1, 1)]
    assert any(r["update"] >= 32 for r in progress.restarts)  # caught in epoch 2, the first one at the peak rate
    assert progress.lr == pytest.approx(0.025) and progress.warmup_epochs == 1
    for r in progress.restarts:
        assert r["loss"] > r["threshold"]
        assert r["threshold"] == pytest.approx(3.0 * max(progress.first_loss, math.log(10)))
    assert all(e["train_loss"] < 3.0 * math.log(10) for e in progress.epochs_log)
    assert len(progress.epochs_log) == 2  # only the finished run's epochs are logged
    # restarting restored the starting weights: identical to a run started at the final rate and warm-up
    fresh, fresh_progress = run(0.025, batch_size=16, warmup_epochs=1)
    assert fresh_progress.restarts == []
    assert_same_weights(model, fresh)


def test_a_warm_up_alone_cures_a_blow_up_at_the_same_rate():
    model, progress = run(0.12)  # 16 updates an epoch: blows up at 0.12 from the start, trains when warmed up
    assert [(r["lr"], r["new_lr"], r["new_warmup_epochs"]) for r in progress.restarts] == [(0.12, 0.12, 1)]
    assert progress.lr == 0.12 and progress.warmup_epochs == 1
    fresh, fresh_progress = run(0.12, warmup_epochs=1)
    assert fresh_progress.restarts == []
    assert_same_weights(model, fresh)


def test_a_one_epoch_stage_or_one_with_a_warm_up_restarts_at_half_the_rate():
    for kwargs in ({"epochs": 1}, {"warmup_epochs": 1}):
        _, progress = run(0.2, batch_size=16, **kwargs)
        warmup = kwargs.get("warmup_epochs", 0)
        assert progress.restarts and all(r["new_lr"] == pytest.approx(r["lr"] / 2) and r["new_warmup_epochs"] ==
                                         warmup for r in progress.restarts)


def test_without_the_guard_the_same_stage_blows_up():
    _, progress = run(0.2, divergence_factor=None)
    assert progress.restarts == [] and progress.lr is None
    assert progress.epochs_log[-1]["train_loss"] > 3.0 * math.log(10)


def test_out_of_restarts_raises_with_the_rate():
    with pytest.raises(TrainingDiverged, match=r"blew up at lr 0.8.*after 1 restarts \(a warm-up, then half the "
                                               r"rate\).*lower rate"):
        run(0.8, max_restarts=1)


class Interrupted(Exception):
    pass


class Sabotage:
    """A torch-pruning style regulariser that, from update ``start`` on, scales the weights up (``"grow"``: the loss
    rises, finite) or fills them with NaN."""

    def __init__(self, start: int, how: str) -> None:
        self.start, self.how, self.calls = start, how, 0

    def regularize(self, model: nn.Module) -> None:
        self.calls += 1
        if self.calls >= self.start:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5) if self.how == "grow" else p.fill_(float("nan"))


def test_after_the_first_epoch_only_a_non_finite_loss_restarts():
    # a loss that climbs in epoch 2 (say sparsity training annealing layers away) is no rate's fault: no restart
    model = linear_model()
    settings = StageSettings(name="t", epochs=2, lr=0.01, batch_size=32, weight_decay=0.0, progress=False)
    progress = train_stage(model, synthetic(512), settings, regularizers=[Sabotage(20, "grow")])
    assert progress.restarts == [] and progress.epochs_log[1]["train_loss"] > 10 * math.log(10)
    # NaN in epoch 2 restarts (here every attempt: the sabotage comes back) and ends in TrainingDiverged
    settings = StageSettings(name="t", epochs=2, lr=0.01, batch_size=32, weight_decay=0.0, progress=False,
                             max_restarts=1)
    with pytest.raises(TrainingDiverged, match="after 1 restarts"):
        train_stage(linear_model(), synthetic(512), settings, regularizers=[Sabotage(20, "nan")])


def test_resumed_stage_keeps_the_lowered_rate_and_the_warm_up():
    whole, whole_progress = run(0.15, batch_size=8)  # 64 updates an epoch: every restart happens in epoch 1
    assert [r["new_warmup_epochs"] for r in whole_progress.restarts] == [1, 1, 1, 1]
    assert whole_progress.lr == pytest.approx(0.15 / 8) and all(r["update"] < 64 for r in whole_progress.restarts)
    saved = {}

    def interrupt(progress):  # the pipeline checkpoints here; the process then dies
        saved.update(progress=copy.deepcopy(progress.to_dict()), weights=copy.deepcopy(model.state_dict()))
        raise Interrupted

    model = linear_model()
    with pytest.raises(Interrupted):
        run(0.15, model=model, batch_size=8, on_epoch_end=interrupt)
    assert saved["progress"]["lr"] == pytest.approx(whole_progress.lr) and saved["progress"]["warmup_epochs"] == 1
    resumed = linear_model()
    resumed.load_state_dict(saved["weights"])
    # asked at 0.15 with no warm-up again: runs at the saved rate and warm-up
    _, progress = run(0.15, model=resumed, batch_size=8, resume=saved["progress"])
    assert progress.restarts == whole_progress.restarts and progress.lr == whole_progress.lr
    assert progress.warmup_epochs == 1
    assert_same_weights(resumed, whole)


@pytest.mark.parametrize("kwargs, match", [({"divergence_factor": 1.0}, "divergence_factor must be > 1"),
                                           ({"max_restarts": -1}, "max_restarts must be an int >= 0")])
def test_bad_guard_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StageSettings(name="t", epochs=1, lr=0.1, **kwargs)


def test_report_lists_restarts(tmp_path):
    restarts = [{"stage": "finetune", "update": 7, "loss": 26.8, "threshold": 8.7, "lr": 0.02, "new_lr": 0.02,
                 "warmup_epochs": 0, "new_warmup_epochs": 1},
                {"stage": "finetune", "update": 9, "loss": 9.1, "threshold": 8.7, "lr": 0.02, "new_lr": 0.01,
                 "warmup_epochs": 1, "new_warmup_epochs": 1}]
    write_report({"settings": {}, "stages": [], "restarts": restarts}, tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert ("Restarted: finetune at update 7, mean loss 26.8 > 8.7 (divergence guard), lr 0.02 -> 0.02, warm-up "
            "epochs 0 -> 1\n") in md
    assert "Restarted: finetune at update 9, mean loss 9.1 > 8.7 (divergence guard), lr 0.02 -> 0.01\n" in md


class ClosingCap:
    """A LayerPruner stand-in whose budget cap falls from 1 to 0 over ``steps`` updates (what the training stage
    reads of a budget-driven pruner), next to ``Sabotage``'s rising loss."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done, self.gates = steps, 0, {}

    @property
    def budget_cap(self):
        return max(0.0, 1.0 - self.done / (0.75 * self.steps))

    def attach(self, optimizer):
        pass

    def detach(self):
        pass

    def regularize(self, model):
        self.done += 1

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


def test_a_loss_rising_as_the_budget_cap_closes_is_not_a_blow_up():
    """One-epoch sparsity training (32 updates, the cap closing by update 24): the loss climbs once the budgeted
    layers have half faded out (the weights grow from update 14, cap 0.42): no restart; the same climb without a
    closing cap is restarted. Before the cap is half closed the check still holds (a climb from update 2)."""
    settings = StageSettings(name="sparsity", epochs=1, lr=0.01, batch_size=16, weight_decay=0.0, progress=False)
    progress = train_stage(linear_model(), synthetic(512), settings, pruner=ClosingCap(32),
                           regularizers=[Sabotage(14, "grow")])
    assert progress.restarts == []
    settings = dataclasses_replace(settings, max_restarts=1)
    with pytest.raises(TrainingDiverged):  # the same climb without a closing budget cap: the rate is blamed
        train_stage(linear_model(), synthetic(512), settings, regularizers=[Sabotage(14, "grow")])
    with pytest.raises(TrainingDiverged):  # a climb from update 2 (cap 0.96): the rate is blamed
        train_stage(linear_model(), synthetic(512), settings, pruner=ClosingCap(32), regularizers=[Sabotage(2, "grow")])
