"""Train the committed baselines every pruning benchmark starts from: CIFAR ResNets on full Fashion-MNIST.

Recipe (per architecture, one seed): the full 60,000 training images, crop (2 px padding) + flip, SGD momentum 0.9,
weight decay 5e-4, batch 128, lr 0.1 with one warm-up epoch then cosine to 0 over ``--epochs`` (per update),
plain cross-entropy. Top-1 on the full 10,000-image test set after every epoch.

Converged means: the test top-1 of the last 3 epochs spans < 0.1 pt (the issue's plateau rule). The script says
whether the finished run meets it; if not, re-run with more ``--epochs`` (a new schedule, new run folder).

Resumable per epoch, across sessions: the run folder (``--runs``, default ``benchmarks/baselines/partial``, commit
it while a run is unfinished; the finished run removes it) keeps a checkpoint after every epoch; the same command
continues where it stopped. When the schedule ends the weights are written with
``resconv_plugin.save`` (safetensors + recipe, loadable with ``resconv_plugin.load``) to
``benchmarks/baselines/<arch>_fmnist.safetensors`` and the table ``benchmarks/baselines/README.md`` /
``baselines.json`` is rewritten from every finished baseline.

Usage: python benchmarks/baselines/train.py --arch cifar_resnet20 [--epochs 20] [--seed 0] [--threads N] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import resconv_plugin  # noqa: E402
from resconv_plugin.workflow import StageSettings, evaluate, train_stage  # noqa: E402
from resconv_plugin.data import build_datasets  # noqa: E402
from common import environment  # noqa: E402

PLATEAU_EPOCHS, PLATEAU_PT = 3, 0.1


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plateau(accuracies) -> bool:
    """Whether the last ``PLATEAU_EPOCHS`` test accuracies span less than ``PLATEAU_PT`` points."""
    last = accuracies[-PLATEAU_EPOCHS:]
    return len(last) == PLATEAU_EPOCHS and max(last) - min(last) < PLATEAU_PT


def weights_path(arch: str) -> Path:
    """Where the committed baseline of ``arch`` lives."""
    return HERE / f"{arch}_fmnist.safetensors"


def write_table() -> None:
    """Rewrite baselines.json and README.md from the metadata of every finished baseline."""
    entries = []
    for meta in sorted(HERE.glob("*_fmnist.json")):
        entries.append(json.loads(meta.read_text()))
    (HERE / "baselines.json").write_text(json.dumps(entries, indent=2) + "\n")
    lines = ["# Baselines: CNNs trained on full Fashion-MNIST", "",
             "Every pruning benchmark starts from these weights (as users start from pretrained models). Load one "
             "with `resconv_plugin.load(path)`. Written by `benchmarks/baselines/train.py` (its docstring gives the "
             "recipe); top-1 on the full 10,000-image test set.", "",
             "| file | arch | command | seed | epochs | top-1 % | last 3 epochs | converged (< 0.1 pt over 3) | "
             "train time |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {Path(e['file']).name} | {e['arch']} | `{e['command']}` | {e['seed']} | {e['epochs']} | "
                     f"{e['top1']:.2f} | {', '.join(f'{a:.2f}' for a in e['curve'][-3:])} | "
                     f"{'yes' if e['converged'] else 'no'} | {e['train_minutes']:.0f} min |")
    lines += [""]
    for e in entries:
        lines.append(f"Environment of {Path(e['file']).name}: " + ", ".join(
            f"{k} {v}" for k, v in e["environment"].items() if k != "command") + "\n")
    notes = [f"- {Path(e['file']).name}: {e['note']}" for e in entries if e.get("note")]
    lines += ["Notes:", "", *notes, ""] if notes else []
    (HERE / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, help="cifar_resnet20, cifar_resnet56, ...")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--runs", type=Path, default=HERE / "partial")
    parser.add_argument("--note", default="", help="a sentence kept with this baseline in the table (how it was "
                                                   "run, what it is for)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = build_datasets("fashion-mnist", seed=args.seed)
    model = timm.create_model(args.arch, num_classes=10, in_chans=1)
    run = args.runs / f"{args.arch}_s{args.seed}_e{args.epochs}"
    state_file = run / "checkpoint.pt"
    resume, elapsed = None, 0.0
    if state_file.exists():
        saved = torch.load(state_file, weights_only=False)
        model.load_state_dict(saved["model"])
        resume, elapsed = saved["progress"], saved["elapsed"]
        print(f"{args.arch}: resuming at epoch {resume['epoch']}/{args.epochs}", flush=True)
    start = time.time()

    def checkpoint(progress) -> None:
        entry = progress.epochs_log[-1]
        print(f"{args.arch} epoch {entry['epoch']}/{args.epochs}: test top-1 {entry['val_acc']:.2f}%, "
              f"train loss {entry['train_loss']:.4f}, {entry['seconds']:.0f}s", flush=True)
        _atomic_torch_save({"model": model.state_dict(), "progress": progress.to_dict(),
                            "elapsed": elapsed + time.time() - start}, state_file)

    settings = StageSettings(name=f"{args.arch} baseline", epochs=args.epochs, lr=args.lr, warmup_epochs=1,
                             seed=args.seed, progress=False)
    progress = train_stage(model, data, settings, resume=resume, on_epoch_end=checkpoint)
    curve = [e["val_acc"] for e in progress.epochs_log]
    top1 = evaluate(model, data)
    path = resconv_plugin.save(model.eval(), weights_path(args.arch), model_name=args.arch,
                               model_kwargs={"num_classes": 10, "in_chans": 1})
    env = environment()
    meta = {"file": str(path.relative_to(HERE.parent.parent)), "arch": args.arch, "seed": args.seed,
            "epochs": args.epochs, "lr": args.lr, "top1": top1, "curve": curve, "converged": plateau(curve),
            "train_minutes": (elapsed + time.time() - start) / 60, "command": env["command"], "environment": env,
            "note": args.note}
    (HERE / f"{args.arch}_fmnist.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_table()
    state_file.unlink()  # finished: the weights file replaces the resumable checkpoint
    if run.exists() and not any(run.iterdir()):
        run.rmdir()
    print(json.dumps({k: v for k, v in meta.items() if k != "environment"}))


if __name__ == "__main__":
    main()
