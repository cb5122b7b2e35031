"""Budget-driven depth pruning of a CIFAR-style ResNet-20 on real Fashion-MNIST, end to end.

baseline (train, or load --baseline) -> convert (ResConv) -> sparsity training with a FLOPs budget
(LayerPruner(flops_reduction=..., sparsity_steps=...)) -> step(): remove the budgeted layers -> fuse -> evaluate.

What it checks and reports: every budgeted gate is exactly 0 at the end of sparsity training, removing those layers
changes test accuracy by exactly 0, the fused model matches, and the FLOPs (fvcore) / parameters before and after.
Ends with one JSON line.

Usage:
    python examples/depth_prune_fashion_mnist.py --quick               # ~30 s, a subset (run by the tests)
    python examples/depth_prune_fashion_mnist.py --baseline-epochs 15 --sparsity-epochs 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import resconv_plugin
from resconv_plugin.data import MEAN_STD, load_idx_dataset
from resconv_plugin.workflow import remove_pruned


def batches(n: int, batch: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n - batch + 1, batch):
        yield perm[i:i + batch]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(x, (dx, dy), (2, 3))


def train(model, x, y, epochs: int, lr: float, batch: int, seed: int, pruner=None, label: str = "") -> None:
    g = torch.Generator().manual_seed(seed)
    steps = epochs * (len(x) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15) \
        if pruner is None else torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if pruner is not None:
        pruner.attach(opt)
    model.train()
    for epoch in range(epochs):
        start = time.time()
        for idx in batches(len(x), batch, g):
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            if pruner is not None:
                pruner.regularize(model)
            opt.step()
            sched.step()
        zeros = sum(v == 0.0 for v in pruner.gates.values()) if pruner is not None else 0
        print(f"{label} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.time() - start:.0f}s"
              + (f", gates at 0: {zeros}/{len(pruner.gates)}" if pruner is not None else ""), flush=True)
    model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    correct = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--downsample", choices=["A", "B"], default="B", help="CIFAR ResNet stage shortcut type")
    parser.add_argument("--baseline", type=Path, help="state dict of a trained baseline (trained here if missing)")
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--sparsity-epochs", type=int, default=3)
    parser.add_argument("--flops-reduction", type=float, default=0.3)
    parser.add_argument("--reg", type=float, default=1e-2)
    parser.add_argument("--cap-start", type=float, default=0.0)
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the pruned model after removal, before fusion (gates frozen)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--sparsity-lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    parser.add_argument("--test-subset", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--quick", action="store_true", help="2048 training / 1000 test images, 1 + 1 epochs")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    if args.quick:
        args.train_subset, args.test_subset = args.train_subset or 2048, args.test_subset or 1000
        args.baseline_epochs, args.sparsity_epochs = 1, 1
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)

    mean, std = MEAN_STD["fashion-mnist"]
    x_train, y_train = load_idx_dataset("fashion-mnist", True, args.data_dir)
    x_test, y_test = load_idx_dataset("fashion-mnist", False, args.data_dir)
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    if args.test_subset:
        x_test, y_test = x_test[:args.test_subset], y_test[:args.test_subset]
    x_train, x_test = (x_train.float() / 255 - mean) / std, (x_test.float() / 255 - mean) / std
    example = x_test[:1]

    kwargs = {"downsample": args.downsample} if args.model.startswith("cifar_") else {}
    model = timm.create_model(args.model, num_classes=10, in_chans=1, **kwargs)
    if args.baseline and args.baseline.exists():
        model.load_state_dict(torch.load(args.baseline, map_location="cpu"))
        print(f"baseline loaded from {args.baseline}")
    else:
        train(model, x_train, y_train, args.baseline_epochs, args.lr, args.batch, args.seed, label="baseline")
        if args.baseline:
            args.baseline.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.baseline)
    baseline_acc = accuracy(model, x_test, y_test)
    baseline_flops = resconv_plugin.count_flops(model, example)

    report = resconv_plugin.convert(model, example)
    converted_acc = accuracy(model, x_test, y_test)
    steps = args.sparsity_epochs * (len(x_train) // args.batch)
    pruner = resconv_plugin.LayerPruner(model, example, reg=args.reg, flops_reduction=args.flops_reduction,
                                        sparsity_steps=steps, calibration_inputs=x_train[:256],
                                        cap_start=args.cap_start)  # training images: no test image decides
    train(model, x_train, y_train, args.sparsity_epochs, args.sparsity_lr, args.batch, args.seed + 1, pruner,
          label="sparsity")
    gates = pruner.gates
    budgeted = pruner.select()
    sparse_acc = accuracy(model, x_test, y_test)
    removed = remove_pruned(model, example, pruner, calibration_inputs=x_train[:256]).removed  # the workflow's
    # rule: the annealed set, and any other gate at exactly 0
    pruned_acc = accuracy(model, x_test, y_test)
    finetuned_acc = None
    if args.finetune_epochs:  # the workflow's rule (resconv_plugin.workflow.finetune does the same with timm's
        # training): before fusion, so the remaining ResConv layers keep their BatchNorms; gates frozen
        resconv_plugin.freeze_gates(model)
        train(model, x_train, y_train, args.finetune_epochs, args.sparsity_lr, args.batch, args.seed + 2,
              label="fine-tune")
        finetuned_acc = accuracy(model, x_test, y_test)
    fused = resconv_plugin.fuse(model.eval())
    fused_acc = accuracy(fused, x_test, y_test)
    fused_flops = resconv_plugin.count_flops(fused, example)

    summary = {
        "model": args.model, "model_kwargs": kwargs, "seed": args.seed, "train_images": len(x_train), "test_images": len(x_test),
        "baseline_epochs": args.baseline_epochs, "sparsity_epochs": args.sparsity_epochs, "reg": args.reg,
        "cap_start": args.cap_start,
        "flops_reduction_target": args.flops_reduction, "converted_layers": len(report.converted),
        "gates": {k: round(v, 6) for k, v in gates.items()},
        "budgeted_layers": budgeted, "budgeted_gates_all_zero": all(gates[n] == 0.0 for n in budgeted),
        "removed": removed, "removal_output_change": pruner.last_step.max_abs_change,
        "acc_baseline": baseline_acc, "acc_converted": converted_acc, "acc_after_sparsity": sparse_acc,
        "acc_after_removal": pruned_acc, "acc_fused": fused_acc, "finetune_epochs": args.finetune_epochs,
        "acc_finetuned": finetuned_acc,
        "removal_acc_change": pruned_acc - sparse_acc,
        "flops_baseline": baseline_flops.total, "flops_pruned_fused": fused_flops.total,
        "flops_reduction": 1 - fused_flops.total / baseline_flops.total,
        "params_baseline": baseline_flops.params, "params_pruned_fused": fused_flops.params,
        "torch": torch.__version__, "timm": timm.__version__,
    }
    print(f"baseline {baseline_acc:.2f}% -> after sparsity {sparse_acc:.2f}% -> removed {len(removed)} layers "
          f"{pruned_acc:.2f}% (change {pruned_acc - sparse_acc:+.2f})"
          + (f" -> fine-tuned {args.finetune_epochs} epochs {finetuned_acc:.2f}%" if finetuned_acc is not None else "")
          + f" -> fused {fused_acc:.2f}%; FLOPs {baseline_flops.total / 1e6:.2f}M -> {fused_flops.total / 1e6:.2f}M "
          f"(-{100 * summary['flops_reduction']:.1f}%)")
    line = json.dumps(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
