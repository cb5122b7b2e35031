"""The ``resconv`` command: ``compress``, ``report``, ``export`` and ``demo``.

Examples::

    resconv demo                         # a trained cifar_resnet20 (Fashion-MNIST), 42% of its FLOPs removed
    resconv compress --model cifar_resnet56 --data fashion-mnist --flops-reduction 0.5 --output runs/r56
    resconv compress --config my_run.yaml --channel-pruning 0.2
    torchrun --nproc_per_node=2 -m resconv_plugin.cli compress --model cifar_resnet20 ...
    resconv report runs/r56/model.safetensors --data fashion-mnist --runtime onnxruntime
    resconv export runs/r56/model.safetensors --onnx r56.onnx

Settings come from the command line and/or a YAML file (``--config``; keys are the long option names, with ``-`` or
``_``); the command line wins. Re-running the same command resumes an interrupted run from its last checkpoint.

The command only parses: options and YAML become a :class:`resconv_plugin.workflow.CompressionConfig`, which
:func:`resconv_plugin.workflow.compress` runs (the same pipeline the benchmarks and examples use).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import shlex
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from resconv_plugin.measure.latency_cost import RUNTIMES
from resconv_plugin.workflow.config import (
    DATASETS, CompressionConfig, ConfigError, option_flag, setting_types,
)

__all__ = ["main", "build_parser", "parse_compress_args"]

log = logging.getLogger("resconv")

#: Options of the command that are not settings of the run (the rest are CompressionConfig's fields, one option each,
#: generated from the fields: :func:`resconv_plugin.workflow.config.setting`).
COMMAND_ONLY = ("command_name", "config", "quick", "log_level")
#: Fields the demo fixes (no option).
DEMO_FIXED = ("model",)
QUICK = {"train_subset": 1024, "val_subset": 512, "latency_repeats": 10, "epochs": 1, "sparsity_epochs": 1,
         "finetune_epochs": 1, "calibration_size": 64, "joint_recovery_steps": 8}
#: ``resconv demo``: the trained cifar_resnet20 shipped with the package (94.56% on Fashion-MNIST) loses over a third
#: of its FLOPs in a few minutes, depth and width together: three of its 7 gated blocks removed one-shot
#: (``--flops-reduction 0.34``; iterative removal: the block whose removal costs least on the calibration batch,
#: re-measured after each), then torch-pruning's global L2 channel pruner takes 3% of the channels (``--channel-pruning
#: 0.03``), then 5 epochs of distilled fine-tuning on 20,000 training images. Measured: 94.56% -> 93.78% / 93.74%
#: (-0.78 / -0.82 pt, two runs), FLOPs -42.3%, 3.7-4.6 minutes on 2 cores. The command's default recipe (block gates,
#: removal-bn, 1 + 5 epochs) spends an epoch fading the blocks; one-shot removal (benchmark 8's depth_block_oneshot)
#: fits a few minutes better. Depth alone on 6,000 images and 6 epochs ended 0.9-1.3 pt down at 34.95% of the FLOPs.
#: (``pretrained_file``: :func:`resconv_plugin.models.weights.bundled_file`, filled in when the demo is parsed.)
DEMO = {"model": "cifar_resnet20", "data": "fashion-mnist", "epochs": 0, "train_subset": 20000, "level": "block",
        "importance": "removal-iterative", "sparsity_epochs": 0, "finetune_epochs": 5, "flops_reduction": 0.34,
        "channel_pruning": 0.03, "output": "runs/demo"}


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


def _argument(f: dataclasses.Field, hint: Any) -> Dict[str, Any]:
    """``add_argument`` keywords of a :class:`CompressionConfig` field: its default, help and allowed choices, and
    the option's form from the field's annotation (see :func:`resconv_plugin.workflow.config.setting`)."""
    union = typing.get_origin(hint) is typing.Union
    base = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    kind, origin = base[0], typing.get_origin(base[0])
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    choices, ranged = f.metadata["choices"], f.metadata["range"] is not None
    words = tuple(c for c in choices if isinstance(c, str))
    kw: Dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"]}
    if kind is bool and len(base) == 1:
        kw["action"] = (argparse.BooleanOptionalAction if union else
                        "store_false" if default else "store_true")
    elif origin is dict:
        kw.update(nargs="*", action=_KeyValue, metavar="KEY=VALUE")
    elif origin is list:
        kw["nargs"] = "*"
    elif words and ranged:  # a number, or one of the words
        kw["type"] = _number_or(words)
    elif kind in (int, float, Path):
        kw["type"] = kind
    if choices and not ranged:
        kw["choices"] = choices
    return kw


def _number_or(words: Tuple[str, ...]) -> Callable[[str], Any]:
    def parse(text: str):
        return text if text in words else float(text)

    parse.__name__ = f"number or {' / '.join(words)}"  # argparse's "invalid ... value" message
    return parse


def _add_compress_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    """One option per :class:`CompressionConfig` field, in groups (``--help``), then the command's own."""
    groups: Dict[str, argparse._ArgumentGroup] = {}
    hints = setting_types()
    for f in dataclasses.fields(CompressionConfig):
        flag = option_flag(f)
        if flag is None or (demo and f.name in DEMO_FIXED):
            continue
        title = f.metadata["group"]
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        group.add_argument(flag, **_argument(f, hints[f.name]))
    run = groups["run"]
    run.add_argument("--quick", action="store_true",
                     help="smoke check: 1024 / 512 images, one epoch per stage, a 64-image calibration batch, 8 "
                          "recovery steps per joint candidate (explicit options win)")
    run.add_argument("--log-level", default="INFO")
    if demo:
        p.set_defaults(output=Path(DEMO["output"]))
        next(a for a in p._actions if a.dest == "output").help = f"run folder (default: {DEMO['output']})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resconv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    p = sub.add_parser("compress", help="train / load, depth-prune, fine-tune, fuse, save and report a timm model")
    p.add_argument("--config", type=Path, help="YAML file of settings (long option names as keys)")
    _add_compress_options(p)
    p = sub.add_parser("demo", help="compress the trained cifar_resnet20 shipped with the package (Fashion-MNIST)")
    _add_compress_options(p, demo=True)
    p = sub.add_parser("report", help="accuracy, FLOPs, params, latency (in a chosen runtime) and per-layer table of "
                                      "a saved model")
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
    p.add_argument("--runtime", "--latency-runtime", dest="runtime", choices=RUNTIMES, default="eager",
                   help="the runtime latency is timed in (resconv_plugin.LatencyCost; default eager PyTorch)")
    p.add_argument("--latency-batch-size", type=int, default=1, help="the batch size latency is timed at")
    p.add_argument("--latency-threads", type=int, help="CPU threads of the runtime (default: its own)")
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
    """The settings of a YAML file as parser defaults. Keys are the options' long names or their fields' names,
    with ``-`` or ``_`` (``no-plots: true`` is ``plots: false``)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option names to values")
    known = {}  # key -> (field or option dest, whether the key says the opposite: no_plots)
    for action in parser._actions:
        if action.dest in ("config", "help"):
            continue
        known[action.dest] = (action.dest, False)
        for option in action.option_strings:
            key = option.lstrip("-").replace("-", "_")
            known.setdefault(key, (action.dest, key == f"no_{action.dest}"))
    paths = {name for name, hint in setting_types().items() if Path in (hint, *typing.get_args(hint))}
    result = {}
    for key, value in config.items():
        name = str(key).replace("-", "_")
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise ConfigError(f"--config {path}: unknown setting {key!r}" +
                             (f" (did you mean {', '.join(close)}?)" if close else ""))
        dest, opposite = known[name]
        result[dest] = (not value if opposite else
                        Path(value) if dest in paths and value else value)
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
    config = CompressionConfig(**settings, command="resconv " + " ".join(shlex.quote(a) for a in argv))
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
        recipe = resconv_plugin.deploy.read_recipe(path)
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
    from resconv_plugin.workflow.report import latency_column, measure

    model, recipe, path, example = _load_checkpoint(args)
    top1 = None
    if args.data:
        from resconv_plugin.workflow.training import evaluate
        from resconv_plugin.data import build_datasets

        data = build_datasets(args.data, args.data_dir, img_size=args.img_size or example.shape[-1],
                              in_chans=example.shape[1], val_subset=args.val_subset)
        top1 = evaluate(model, data)
    try:
        cost = resconv_plugin.LatencyCost(args.runtime, batch_size=args.latency_batch_size,
                                          threads=args.latency_threads, repeats=args.latency_repeats)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--runtime {args.runtime}: {exc}") from exc
    figures = measure(model, example, accuracy=top1, latency_cost=cost)
    flops = resconv_plugin.count_flops(model, example)
    print(f"{path}: {recipe['model']['name']} {recipe['model'].get('kwargs', {})}, steps: "
          + " -> ".join(s["op"] for s in recipe.get("steps", [])))
    print(format_table(["top-1 %", "FLOPs", "params", latency_column(figures["latency"]), "input"],
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
