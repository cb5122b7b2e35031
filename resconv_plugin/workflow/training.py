"""One training stage of the ``resconv`` workflow, built from timm's training pieces, resumable per epoch.

timm's ``create_optimizer_v2`` / ``create_scheduler_v2`` (stepped per update), its losses (label smoothing, soft
targets for mixup / cutmix), ``Mixup`` and ``ModelEmaV3``; optional distillation from a teacher; the
:class:`~resconv_plugin.LayerPruner` regulariser in sparsity training; DistributedDataParallel under ``torchrun``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from resconv_plugin._checks import Interval, check_choice, check_int, check_number
from resconv_plugin.workflow.distributed import Dist
from resconv_plugin.distill import distillation_loss
from resconv_plugin.workflow.syncbn import synchronized_batchnorm
from resconv_plugin.data import BatchLoader, ImageData

__all__ = ["StageSettings", "StageProgress", "TrainingDiverged", "train_stage", "evaluate", "model_device",
           "NEAR_ZERO", "AMP_DTYPES", "check_amp", "grad_scaler"]

log = logging.getLogger("resconv")

#: A gate counts as "near zero" in the progress bar below this |gamma|.
NEAR_ZERO = 0.05
#: The divergence check compares the mean loss of this many updates with its threshold.
DIVERGENCE_WINDOW = 10
#: In sparsity training, the loss level is checked only while the budget cap is at least this (then: finiteness).
CAP_LEVEL_CHECK = 0.5


class TrainingDiverged(RuntimeError):
    """A stage's training loss still blew up after every allowed restart (with a warm-up, then at lower rates:
    ``StageSettings.divergence_factor`` / ``max_restarts``): train it with a lower rate."""


@dataclass
class StageSettings:
    """What one training stage runs: epochs, optimiser, schedule and the optional extras."""

    name: str
    epochs: int
    lr: float
    batch_size: int = 128
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 0.0
    smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.998
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0
    workers: int = 0
    progress: bool = True
    gamma_points_per_epoch: int = 20
    amp: Optional[str] = None
    channels_last: bool = False
    divergence_factor: Optional[float] = 3.0
    max_restarts: int = 4

    def __post_init__(self) -> None:
        check_number("divergence_factor", self.divergence_factor, Interval(1, low_open=True), optional=True)
        check_int("max_restarts", self.max_restarts, 0)


StageSettings.__doc__ += """

    Divergence guard: when the mean training loss of the last 10 updates in the stage's first epoch exceeds
    ``divergence_factor`` times the larger of the stage's first loss and ln(number of classes) (the loss of a uniform
    guess), or any loss is not finite, the stage restarts from where this call began (the model, the pruner's and
    the optimiser's state): the first time, when the stage has no warm-up and more than one epoch, at the same rate
    with a one-epoch linear warm-up (the usual cure for a loss that blows up in the first updates: a freshly pruned
    network is at a sharp point of its loss; measured on cifar_resnet56 with 36 of 52 layers removed, 3 epochs: 91.75%
    with the warm-up at 0.02 against 91.04% at the 0.005 that halving came down to); otherwise, and on every later
    restart, at half the rate; up to ``max_restarts`` times, then it raises :class:`TrainingDiverged`. The level
    check covers the stage's first epoch at its peak rate (with a warm-up, the warm-up epochs and the one after),
    and in sparsity training only while the pruner's budget cap is at least ``CAP_LEVEL_CHECK`` (0.5): as the
    budgeted layers fade out the loss rises by design (a one-epoch sparsity stage of cifar_resnet56 with 15 blocks
    budgeted crossed 3 ln 10 there and was restarted twice at lower rates). Each restart is logged and kept in :attr:`StageProgress.restarts`; the rate and warm-up in effect are saved with
    the progress, so a resumed stage keeps them. ``divergence_factor=None`` turns the check off.

    Example:
        >>> StageSettings(name="finetune", epochs=3, lr=0.02, divergence_factor=None).lr
        0.02
"""


@dataclass
class StageProgress:
    """The resumable state of a stage: saved after every epoch. ``lr`` / ``warmup_epochs``: the stage's peak rate
    and warm-up after the divergence guard's restarts (None: the settings'); ``restarts``: one entry per restart
    (stage name, update, mean loss, threshold, the rate and warm-up given up and the new ones)."""

    epoch: int = 0
    updates: int = 0
    optimizer: Optional[dict] = None
    ema: Optional[dict] = None
    pruner: Optional[dict] = None
    scaler: Optional[dict] = None
    epochs_log: List[dict] = field(default_factory=list)
    gamma_trace: List[dict] = field(default_factory=list)
    first_loss: Optional[float] = None
    lr: Optional[float] = None
    warmup_epochs: Optional[int] = None
    restarts: List[dict] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


#: ``--amp`` choices -> autocast dtype.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _scaler_factory(device_type: str) -> Optional[Callable[[], Any]]:
    """The GradScaler of ``device_type``: ``torch.amp.GradScaler`` (torch >= 2.3), else torch.cuda.amp's on CUDA
    (torch 2.1 / 2.2, which pyproject allows), else None."""
    if hasattr(torch.amp, "GradScaler"):
        return lambda: torch.amp.GradScaler(device_type)
    if device_type == "cuda":
        return torch.cuda.amp.GradScaler
    return None


def check_amp(amp: Optional[str], device: Union[str, torch.device], option: str = "amp") -> None:
    """Raise a ValueError when mixed precision ``amp`` (None, ``"bf16"`` or ``"fp16"``) cannot train on ``device``.

    bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or newer; older GPUs emulate it slowly or not
    at all); fp16 needs a gradient scaler for the device (on the CPU: torch >= 2.3). ``option``: the setting named in
    the message (``"--amp"`` for the command).

    Example:
        >>> check_amp("bf16", "cpu")
        >>> check_amp("int8", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: amp must be one of bf16, fp16 or None, got 'int8'
    """
    check_choice(option, amp, sorted(AMP_DTYPES), optional=True)
    device = torch.device(device)
    if amp == "bf16" and device.type == "cuda" and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(f"{option} bf16: {torch.cuda.get_device_name(device)} ({device}) has compute capability "
                             f"{major}.{minor}, and bfloat16 needs 8.0 or newer (A100, H100, RTX 30xx and later): "
                             "use fp16 (with loss scaling) or none")
    if amp == "fp16" and _scaler_factory(device.type) is None:
        raise ValueError(f"{option} fp16 on {device.type} needs torch >= 2.3 (torch.amp.GradScaler); this is torch "
                         f"{torch.__version__}: use bf16, or train on a GPU")


def grad_scaler(device: Union[str, torch.device]) -> Any:
    """The loss scaler of fp16 training on ``device`` (``torch.amp.GradScaler``; on torch 2.1 / 2.2, CUDA's).

    Raises:
        ValueError: no scaler for the device in this torch (:func:`check_amp`).
    """
    device = torch.device(device)
    check_amp("fp16", device)
    return _scaler_factory(device.type)()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 500, workers: int = 0) -> float:
    """Top-1 accuracy (%) of ``model`` on the validation split, on the model's device (eval mode; training flag
    restored). ``workers``: DataLoader workers for ImageFolder (decoding a large validation set in the main process
    is slow; in a distributed run the other processes wait for rank 0's evaluation)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in BatchLoader(data, False, batch_size, workers=workers, device=model_device(model)):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_stage(model: nn.Module, data: ImageData, settings: StageSettings, dist: Optional[Dist] = None, *,
                pruner=None, teacher: Optional[nn.Module] = None, resume: Optional[dict] = None,
                on_epoch_end: Optional[Callable[[StageProgress], None]] = None,
                regularizers: Sequence[object] = ()) -> StageProgress:
    """Train ``model`` in place for ``settings.epochs`` epochs, resuming from ``resume`` (a saved StageProgress).

    Example:
        >>> settings = StageSettings(name="sparsity", epochs=3, lr=0.02)
        >>> train_stage(model, data, settings, pruner=pruner)  # doctest: +SKIP

    Args:
        dist: this process's place in a torchrun run (default: a single process).
        pruner: a :class:`~resconv_plugin.LayerPruner` (sparsity training: its gates are reported and traced).
        teacher: distil from this model (``settings.distill_alpha``).
        resume: a saved :class:`StageProgress` (as a dict) to continue from.
        on_epoch_end: called with the progress after every epoch (the caller checkpoints it).
        regularizers: more torch-pruning style regularisers (``regularize(model)`` after ``backward()``), e.g. a
            ``BNScalePruner`` trained alongside the LayerPruner.

    A training loss that blows up restarts the stage from where this call began with a warm-up or at half the rate
    (the divergence guard of :class:`StageSettings`; the restarts are in the returned progress's ``restarts``).

    Raises:
        TrainingDiverged: the loss still blew up after ``settings.max_restarts`` restarts.
    """
    dist = dist or Dist()
    guarded = settings.divergence_factor is not None
    start_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if guarded else None
    start_pruner = pruner.state_dict() if guarded and pruner is not None else None
    restarts: List[dict] = list((resume or {}).get("restarts") or [])
    allowed = len(restarts) + settings.max_restarts  # this call's restarts come on top of a resumed run's
    lr = (resume or {}).get("lr")  # the rate and warm-up a resumed stage had come to
    warmup = (resume or {}).get("warmup_epochs")
    while True:
        if lr is not None:
            settings = replace(settings, lr=lr)
        if warmup is not None:
            settings = replace(settings, warmup_epochs=warmup)
        stage = _Stage(model, data, settings, dist, pruner, teacher, regularizers)
        progress = stage.restore(copy.deepcopy(resume) if guarded else resume)  # a restart needs it untouched
        progress.lr, progress.warmup_epochs, progress.restarts = lr, warmup, restarts
        try:
            with synchronized_batchnorm(model, dist):
                stage.net = nn.parallel.DistributedDataParallel(
                    model, device_ids=[stage.device.index] if stage.device.type == "cuda" else None
                ) if dist.enabled else model
                model.train()
                for epoch in range(progress.epoch, settings.epochs):
                    stage.epoch(epoch, progress)
                    if on_epoch_end is not None:
                        on_epoch_end(progress)
        except _Diverged as blow_up:
            if pruner is not None:
                pruner.detach()
            if len(restarts) >= allowed:
                raise TrainingDiverged(
                    f"{settings.name}: the training loss blew up at lr {settings.lr:.4g} (mean {blow_up.loss:.4g} "
                    f"over the last {DIVERGENCE_WINDOW} updates > {blow_up.threshold:.4g}, update {blow_up.update}) "
                    f"after {settings.max_restarts} restarts (a warm-up, then half the rate): train with a lower "
                    f"rate") from None
            if not restarts and settings.warmup_epochs == 0 and settings.epochs > 1:
                lr, warmup = settings.lr, 1  # first: the same rate, reached by a warm-up
            else:
                lr, warmup = settings.lr / 2, settings.warmup_epochs
            restarts.append({"stage": settings.name, "update": blow_up.update, "loss": blow_up.loss,
                             "threshold": blow_up.threshold, "lr": settings.lr, "new_lr": lr,
                             "warmup_epochs": settings.warmup_epochs, "new_warmup_epochs": warmup})
            log.warning("%s: the training loss blew up at update %d (mean %.4g over the last %d updates > %.4g) at lr "
                        "%.4g: restarting where the stage began at lr %.4g with %d warm-up epochs", settings.name,
                        blow_up.update, blow_up.loss, DIVERGENCE_WINDOW, blow_up.threshold, settings.lr, lr, warmup)
            with torch.no_grad():
                model.load_state_dict(start_model)
            if start_pruner is not None:
                pruner.load_state_dict(start_pruner)
            continue
        break
    stage.finish()
    return progress


class _Diverged(Exception):
    """Raised inside the loop by the divergence check; train_stage restarts the stage (with a warm-up, or at half
    the rate)."""

    def __init__(self, update: int, loss: float, threshold: float) -> None:
        super().__init__(update, loss, threshold)
        self.update, self.loss, self.threshold = update, loss, threshold


class _Stage:
    """The pieces of one training stage (timm optimizer, scheduler, loss, mixup, EMA) and its loop."""

    def __init__(self, model: nn.Module, data: ImageData, s: StageSettings, dist: Dist, pruner, teacher,
                 regularizers: Sequence[object]) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.model, self.net, self.data, self.s, self.dist = model, model, data, s, dist
        self.pruner, self.teacher, self.regularizers = pruner, teacher, list(regularizers)
        self.device = model_device(model)
        self.loader = BatchLoader(data, True, s.batch_size, seed=s.seed, rank=dist.rank, world=dist.world,
                                  workers=s.workers, device=self.device)
        check_amp(s.amp, self.device)
        self.autocast_dtype = AMP_DTYPES.get(s.amp)
        # fp16 needs loss scaling (bf16 has float32's range); gates and the proximal step stay in float32
        self.scaler = grad_scaler(self.device) if s.amp == "fp16" else None
        self.optimizer = create_optimizer_v2(model, opt=s.opt, lr=s.lr, weight_decay=s.weight_decay,
                                             momentum=s.momentum)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=s.sched, num_epochs=s.epochs,
                                                warmup_epochs=s.warmup_epochs, min_lr=s.min_lr, step_on_epochs=False,
                                                updates_per_epoch=len(self.loader))
        self.ema = ModelEmaV3(model, decay=s.model_ema_decay) if s.model_ema else None
        self.mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.smoothing,
                           num_classes=data.num_classes) if (s.mixup or s.cutmix) else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif s.smoothing:
            self.criterion = LabelSmoothingCrossEntropy(s.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.trace_every = max(1, len(self.loader) // max(1, s.gamma_points_per_epoch))
        self.recent_losses: deque = deque(maxlen=DIVERGENCE_WINDOW)
        if teacher is not None:
            teacher.eval().to(self.device)
        if s.channels_last:
            model.to(memory_format=torch.channels_last)

    def restore(self, resume: Optional[dict]) -> StageProgress:
        known = StageProgress.__dataclass_fields__
        progress = StageProgress(**{k: v for k, v in resume.items() if k in known}) if resume else StageProgress()
        if resume:
            self.optimizer.load_state_dict(progress.optimizer)
            if self.ema is not None and progress.ema is not None:
                self.ema.load_state_dict(progress.ema)
            if self.scaler is not None and progress.scaler is not None:
                self.scaler.load_state_dict(progress.scaler)
            if self.pruner is not None and progress.pruner is not None:
                self.pruner.load_state_dict(progress.pruner)
            log.info("%s: resumed at epoch %d/%d (update %d; optimizer state of %d parameters restored)", self.s.name,
                     progress.epoch, self.s.epochs, progress.updates, len(self.optimizer.state))
        if self.pruner is not None:
            self.pruner.attach(self.optimizer)
        self.scheduler.step_update(progress.updates)
        return progress

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def step(self, x: torch.Tensor, y: torch.Tensor, progress: StageProgress) -> tuple:
        """One update; returns (loss, outputs)."""
        s, target = self.s, y
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        with self._autocast():
            out = self.net(x)
            loss = self.criterion(out, target)
            if self.teacher is not None and s.distill_alpha > 0:
                with torch.no_grad():
                    teacher_out = self.teacher(x)
                loss = (1 - s.distill_alpha) * loss + s.distill_alpha * distillation_loss(
                    out.float(), teacher_out.float(), s.distill_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # the regularisers see true gradients
        else:
            loss.backward()
        if self.pruner is not None:
            self.pruner.regularize(self.net)
        for regularizer in self.regularizers:
            regularizer.regularize(self.model)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped on inf / nan gradients (the pruner's step then waits)
            self.scaler.update()
        else:
            self.optimizer.step()
        progress.updates += 1
        self.scheduler.step_update(progress.updates)
        if self.ema is not None:
            self.ema.update(self.model, step=progress.updates)
        return loss, out

    def epoch(self, epoch: int, progress: StageProgress) -> None:
        from tqdm.auto import tqdm

        s, pruner = self.s, self.pruner
        self.loader.set_epoch(epoch)
        start, loss_sum, correct, seen = time.time(), 0.0, 0, 0
        bar = tqdm(self.loader, desc=f"{s.name} {epoch + 1}/{s.epochs}", disable=not (self.dist.main and s.progress),
                   leave=False, dynamic_ncols=True, mininterval=1.0)
        for x, y in bar:
            loss, out = self.step(x, y, progress)
            value = loss.item()
            # once a budget cap has closed half-way, a rising loss is the layers fading out (a one-epoch sparsity
            # stage: its whole first epoch), which a lower rate would not cure: finiteness only from then on
            cap = getattr(pruner, "budget_cap", None)
            self.check_divergence(value, progress, first_epoch=epoch <= s.warmup_epochs and not (
                cap is not None and cap < CAP_LEVEL_CHECK))
            loss_sum += value * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            postfix = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{100 * correct / seen:.1f}"}
            if pruner is not None:
                gates = pruner.gates
                postfix["gates~0"] = f"{sum(abs(g) < NEAR_ZERO for g in gates.values())}/{len(gates)}"
                if self.dist.main and progress.updates % self.trace_every == 0:
                    progress.gamma_trace.append({"update": progress.updates, "gates": gates})
            bar.set_postfix(postfix, refresh=False)
        bar.close()
        loss_sum, correct, seen = self.dist.all_sum(loss_sum, correct, seen)
        progress.epoch = epoch + 1
        entry = {"stage": s.name, "epoch": epoch + 1, "epochs": s.epochs, "train_loss": loss_sum / seen,
                 "train_acc": 100.0 * correct / seen, "lr": self.optimizer.param_groups[0]["lr"],
                 "seconds": time.time() - start}
        if pruner is not None:
            gates = pruner.gates
            entry.update(gates_near_zero=sum(abs(g) < NEAR_ZERO for g in gates.values()),
                         gates_zero=sum(g == 0.0 for g in gates.values()), gates=len(gates))
            progress.pruner = pruner.state_dict()
        if self.dist.main:
            entry["val_acc"] = evaluate(self.ema.module if self.ema is not None else self.model, self.data,
                                        workers=s.workers)
        progress.epochs_log.append(entry)
        log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, val acc %s, lr %.4g, %.0fs%s", s.name, epoch + 1,
                 s.epochs, entry["train_loss"], entry["train_acc"],
                 f"{entry['val_acc']:.2f}%" if "val_acc" in entry else "-", entry["lr"], entry["seconds"],
                 f", gates near 0 (|gamma| < {NEAR_ZERO}): {entry['gates_near_zero']}/{entry['gates']}, exactly 0: "
                 f"{entry['gates_zero']}" if pruner is not None else "")
        progress.optimizer = self.optimizer.state_dict()
        progress.ema = self.ema.state_dict() if self.ema is not None else None
        progress.scaler = self.scaler.state_dict() if self.scaler is not None else None

    def check_divergence(self, loss: float, progress: StageProgress, first_epoch: bool) -> None:
        """Raise _Diverged when the loss is not finite or, up to the stage's first epoch at its peak rate (the
        first epoch, or the warm-up epochs and the one after), the mean of the last
        DIVERGENCE_WINDOW updates exceeds the threshold (every rank decides together under torchrun). Later epochs
        check finiteness only: a rate too high blows up within its first updates, while a loss that rises later may
        be the budget's doing (sparsity training anneals the chosen layers to 0), which a lower rate would not cure."""
        factor = self.s.divergence_factor
        if factor is None:
            return
        if progress.first_loss is None:
            progress.first_loss = loss
        self.recent_losses.append(loss)
        threshold = factor * max(progress.first_loss, math.log(self.data.num_classes))
        mean = sum(self.recent_losses) / len(self.recent_losses)
        blown = not math.isfinite(loss) or (first_epoch and len(self.recent_losses) == DIVERGENCE_WINDOW
                                            and mean > threshold)
        if self.dist.enabled:
            blown = self.dist.all_sum(float(blown))[0] > 0
        if blown:
            raise _Diverged(progress.updates, mean, threshold)

    def finish(self) -> None:
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
            log.info("%s: the model takes the EMA weights", self.s.name)
        if self.pruner is not None:
            self.pruner.detach()
        self.model.eval()
