"""``CompressionConfig``: everything one compression run does, as typed fields (the ``resconv compress`` options).

The ``resconv`` command only parses its options and YAML into this config; :func:`resconv_plugin.workflow.compress`
runs it. Field names are the long option names with ``_`` (``--flops-reduction`` -> ``flops_reduction``).

Example:
    >>> from resconv_plugin.workflow import CompressionConfig
    >>> config = CompressionConfig(model="cifar_resnet20", flops_reduction=0.4, epochs=4).validated()
    >>> config.output, config.level, config.importance, config.sparsity_epochs
    (PosixPath('runs/cifar_resnet20-fashion-mnist'), 'auto', 'auto', None)

``"auto"`` and ``None`` in the recipe fields (``level``, ``importance``, ``sparsity_epochs``, ``finetune_epochs``)
mean the measured-best default, filled in when the run sees its model
(:mod:`resconv_plugin.workflow.defaults`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from resconv_plugin._checks import check_choice
from resconv_plugin.models.weights import ADAPTER_MODELS

__all__ = ["CompressionConfig", "ConfigError", "DEFAULT_BUDGET", "DEFAULT_IMPORTANCE", "DATASETS", "IMPORTANCE_CHOICES",
           "RESUME_IGNORED"]

log = logging.getLogger("resconv")

#: The budget when none is given.
DEFAULT_BUDGET = ("flops_reduction", 0.5)
#: The importance criterion: "auto" is the gate level's measured best (resconv_plugin.workflow.defaults.RECIPES).
DEFAULT_IMPORTANCE = "auto"
IMPORTANCE_CHOICES = ("auto", "magnitude", "removal", "removal-iterative", "removal-bn", "taylor")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagefolder")
#: Settings that may change between a run and its resumption.
RESUME_IGNORED = frozenset({"output", "restart", "progress", "workers", "command", "device", "plots"})


class ConfigError(ValueError):
    """A setting of the run is wrong (the message names it and what is allowed). The ``resconv`` command prints it
    as a one-line error; any other exception is a bug and keeps its traceback."""


@dataclass
class CompressionConfig:
    """One compression run: the model, its data, what to remove, and the training of each stage.

    Stages: baseline (train ``epochs`` from scratch or from ``pretrained_file``; 0 = as loaded) -> convert
    (``level``: "auto" (default), "layer" or "block") -> sparsity training (``sparsity_epochs``; the LayerPruner
    with one budget and ``importance``) -> prune (every gate at exactly 0 goes) -> channel pruning
    (``channel_pruning``) -> fine-tuning (``finetune_epochs``, gates frozen, before fusion) -> fuse -> save ->
    report. ``distill``: sparsity training and fine-tuning learn from the baseline too (None: on whenever there are
    such epochs, the default the ablation chose). Budgets (one of; default ``flops_reduction=0.5``):
    ``flops_reduction``, ``latency_reduction``, ``threshold``, ``pruning_ratio``.

    The recipe fields left at ``"auto"`` / ``None`` take the measured-best recipe of the level the model is
    converted at (:data:`resconv_plugin.workflow.defaults.RECIPES`: block gates, magnitude, 1 + 5 epochs on networks
    with residual blocks; layer gates, iterative removal, 3 + 3 otherwise).
    """

    model: Optional[str] = None
    # model
    pretrained_file: Optional[Path] = None
    pretrained_adapter: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    num_classes: Optional[int] = None
    level: str = "auto"
    init_gamma: float = 1.0
    # data
    data: str = "fashion-mnist"
    data_dir: Optional[Path] = None
    img_size: Optional[int] = None
    in_chans: Optional[int] = None
    train_subset: int = 0
    val_subset: int = 0
    workers: int = 0
    # what to remove
    flops_reduction: Optional[float] = None
    latency_reduction: Optional[float] = None
    threshold: Optional[float] = None
    pruning_ratio: Optional[float] = None
    importance: str = DEFAULT_IMPORTANCE
    reg: Optional[float] = None
    cap_start: float = 0.0
    ignored_layers: List[str] = field(default_factory=list)
    calibration_size: int = 256
    # training
    epochs: int = 10
    lr: float = 0.1
    sparsity_epochs: Optional[int] = None
    sparsity_lr: float = 0.02
    finetune_epochs: Optional[int] = None
    finetune_lr: float = 0.02
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
    distill: Optional[bool] = None
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    # the divergence guard of every training stage (StageSettings.divergence_factor; 0 turns it off)
    divergence_factor: float = 3.0
    # channel pruning: a torch-pruning pruning_ratio, or "auto" (JointPruner splits the budget)
    channel_pruning: Union[float, str] = 0.0
    # with channel_pruning="auto": distilled training steps on each candidate split before it is scored
    joint_recovery_steps: int = 200
    # ... of which this share fades the candidate's layers out before they are removed (JointPruner.recovery_fade)
    joint_recovery_fade: float = 0.0
    # device
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    latency_device: Optional[str] = None
    # run
    output: Optional[Path] = None
    restart: bool = False
    seed: int = 0
    latency_repeats: int = 50
    plots: bool = True
    progress: bool = True
    command: Optional[str] = None

    def budget(self) -> Optional[tuple]:
        """The one budget given, ``(name, value)``, or None (checked by the pruner's single rule)."""
        from resconv_plugin.pruning.pruner import given_budget

        return given_budget(threshold=self.threshold, pruning_ratio=self.pruning_ratio,
                            flops_reduction=self.flops_reduction, latency_reduction=self.latency_reduction)

    def validated(self, world: int = 1) -> "CompressionConfig":
        """A checked copy with the defaults that depend on other fields filled in (the budget, the output folder).

        Args:
            world: processes the run is split over (the batch must divide over them).

        Raises:
            ConfigError: a setting outside what is allowed, named with its field and option.
        """
        try:
            return self._validated(world)
        except ConfigError:
            raise
        except ValueError as exc:  # the library's checks of the same values (model name, the one-budget rule)
            raise ConfigError(str(exc)) from exc

    def _validated(self, world: int) -> "CompressionConfig":
        from resconv_plugin.models.create import check_model_name

        c = dataclasses.replace(self, model_kwargs=dict(self.model_kwargs), ignored_layers=list(self.ignored_layers))
        if not c.model:
            raise ConfigError("model (--model) is required: a timm name, e.g. cifar_resnet20 or resnet18")
        check_model_name(c.model)
        if c.data not in DATASETS:
            raise ConfigError(f"data (--data) must be one of {', '.join(DATASETS)}, got {c.data!r}")
        if c.level not in ("auto", "layer", "block"):
            raise ConfigError(f"level (--level) must be 'auto', 'layer' or 'block', got {c.level!r}")
        if not isinstance(c.importance, str) or c.importance not in IMPORTANCE_CHOICES:
            raise ConfigError(f"importance (--importance) must be one of {', '.join(IMPORTANCE_CHOICES)}, got "
                             f"{c.importance!r}")
        if c.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp (--amp) must be none, bf16 or fp16, got {c.amp!r}")
        for name in ("flops_reduction", "latency_reduction", "threshold", "pruning_ratio"):
            value = getattr(c, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} (--{_flag(name)}) must be in [0, 1], got {value}")
        try:
            budget = c.budget()
        except ValueError:  # the pruner's one-budget rule, told in the command's option names
            names = ("flops_reduction", "latency_reduction", "threshold", "pruning_ratio")
            raise ConfigError("give one of " + ", ".join(f"--{_flag(n)}" for n in names) + "; got " + " and ".join(
                f"--{_flag(n)}" for n in names if getattr(c, n) is not None)) from None
        if budget is None:
            setattr(c, *DEFAULT_BUDGET)
        for name in ("epochs", "sparsity_epochs", "finetune_epochs", "train_subset", "val_subset"):
            value = getattr(c, name)
            if value is None and name in ("sparsity_epochs", "finetune_epochs"):
                continue  # the recipe's default, filled in when the run sees its model
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} (--{_flag(name)}) must be an int >= 0, got {value!r}")
        if isinstance(c.calibration_size, bool) or not isinstance(c.calibration_size, int) or c.calibration_size < 1:
            raise ConfigError(f"calibration_size (--calibration-size) must be a positive int, got "
                             f"{c.calibration_size!r}")
        if c.channel_pruning != "auto" and not (isinstance(c.channel_pruning, (int, float))
                                                 and 0.0 <= c.channel_pruning <= 1.0):
            raise ConfigError(f"channel_pruning (--channel-pruning) must be a ratio in [0, 1] or 'auto', got "
                             f"{c.channel_pruning!r}")
        if (isinstance(c.joint_recovery_steps, bool) or not isinstance(c.joint_recovery_steps, int)
                or c.joint_recovery_steps < 0):
            raise ConfigError(f"joint_recovery_steps (--joint-recovery-steps) must be an int >= 0, got "
                             f"{c.joint_recovery_steps!r}")
        if (isinstance(c.joint_recovery_fade, bool) or not isinstance(c.joint_recovery_fade, (int, float))
                or not 0.0 <= c.joint_recovery_fade < 1.0):
            raise ConfigError(f"joint_recovery_fade (--joint-recovery-fade) must be a fraction in [0, 1), got "
                             f"{c.joint_recovery_fade!r}")
        if c.channel_pruning == "auto" and c.flops_reduction is None and c.latency_reduction is None:
            raise ConfigError("--channel-pruning auto splits a --latency-reduction or --flops-reduction budget between "
                             "layers and channels: give one of them")
        if isinstance(c.divergence_factor, bool) or not isinstance(c.divergence_factor, (int, float)) or not (
                c.divergence_factor == 0 or c.divergence_factor > 1):
            raise ConfigError(f"divergence_factor (--divergence-factor) must be 0 (no check) or > 1, got "
                             f"{c.divergence_factor!r}")
        trains = any(v is None or v > 0 for v in (c.finetune_epochs, c.sparsity_epochs))  # every recipe trains
        if c.distill is None:  # the default: distillation wherever there is training after the baseline
            c.distill = trains
        elif c.distill and not trains:
            raise ConfigError("--distill needs training epochs (--sparsity-epochs or --finetune-epochs > 0): "
                             "distillation happens there")
        if c.pretrained_adapter:
            target = ADAPTER_MODELS[check_choice("pretrained_adapter (--pretrained-adapter)", c.pretrained_adapter,
                                                 ADAPTER_MODELS)]
            if c.model != target:
                raise ConfigError(f"--pretrained-adapter {c.pretrained_adapter} renames keys for {target}, not "
                                 f"--model {c.model}")
        if c.batch_size < 1 or c.batch_size % world:
            raise ConfigError(f"--batch-size {c.batch_size} must be positive and divide over {world} processes")
        if (c.mixup or c.cutmix) and (c.batch_size // world) % 2:
            raise ConfigError(f"--mixup / --cutmix need an even per-process batch, got {c.batch_size // world}")
        if c.in_chans not in (None, 1, 3):
            raise ConfigError(f"--in-chans must be 1 or 3, got {c.in_chans}")
        if c.sparsity_epochs == 0 and c.threshold is not None:
            log.warning("--sparsity-epochs 0 with a threshold: only gates already at or below it are removed")
        if c.output is None:
            c.output = Path("runs") / f"{c.model}-{c.data}"
        c.output = Path(c.output)
        return c

    def resume_settings(self) -> Dict[str, Any]:
        """The settings a resumed run must share with the run it continues (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(dataclasses.asdict(self).items())
                if k not in RESUME_IGNORED}

    def model_factory_kwargs(self) -> Dict[str, Any]:
        """The ``timm.create_model`` keyword arguments of the run's model."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, **(self.model_kwargs or {})}


def _flag(name: str) -> str:
    return name.replace("_", "-")
