"""Deep plain networks: trained from scratch with and without ResConv, then fused (the paper's claim that the
identity shortcut of ResConv lets deep plain networks train).

For each of ``cifar_plain20`` and ``cifar_plain56`` (no residual adds) on Fashion-MNIST:
* plain: trained as built.
* resconv: ``resconv_plugin.convert(model, x, init_gamma=--init-gamma)`` first (every eligible conv becomes
  ``gamma * BN(conv(x)) + (1 - gamma) * x``; gamma starts below 1 so that the identity path carries signal from the
  start), trained the same way (gates are ordinary parameters, no L1), then ``fuse``-d: the result is again a plain
  network of the same architecture (same FLOPs and parameters), evaluated after fusion.
Same data order, augmentation, epochs and optimiser (SGD momentum 0.9, weight decay 5e-4, lr --lr, cosine per update,
batch 128). Figures: top-1 on the full Fashion-MNIST test set; train loss of the last epoch.

Usage: python benchmarks/plain_networks.py [--quick] [--archs cifar_plain20 cifar_plain56] [--epochs 5]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import json
import warnings

import timm
import torch

import resconv_plugin
from resconv_plugin import deployed
from resconv_plugin.workflow import StageSettings, evaluate, train_stage
from resconv_plugin.data import build_datasets
from common import environment, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["cifar_plain20", "cifar_plain56"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--init-gamma", type=float, default=0.5)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="cifar_plain20, 2048 images, 1 epoch")
    args = parser.parse_args()
    name = "plain_networks"
    if args.quick:
        args.archs, args.epochs, args.train_subset, name = ["cifar_plain20"], 1, 2048, "plain_networks_quick"
    warnings.filterwarnings("ignore")
    data = build_datasets("fashion-mnist", train_subset=args.train_subset, seed=args.seed)
    x = torch.zeros(1, 1, 28, 28)
    records, rows = [], []
    for arch in args.archs:
        for variant in ("plain", "resconv"):
            torch.manual_seed(args.seed)
            model = timm.create_model(arch, num_classes=10, in_chans=1)
            converted = 0
            if variant == "resconv":
                converted = len(resconv_plugin.convert(model, x, init_gamma=args.init_gamma).converted)
            settings = StageSettings(name=f"{arch} {variant}", epochs=args.epochs, lr=args.lr, seed=args.seed,
                                     progress=False)
            progress = train_stage(model, data, settings)
            if variant == "resconv":
                gammas = [g.gamma.item() for g in resconv_plugin.deploy.resconv_layers(model).values()]
                model = resconv_plugin.fuse(model.eval())
            flops = resconv_plugin.count_flops(deployed(model), x)
            record = {"arch": arch, "variant": variant, "converted": converted, "epochs": args.epochs,
                      "top1": evaluate(model, data), "train_loss": progress.epochs_log[-1]["train_loss"],
                      "flops": flops.total, "params": flops.params,
                      "val_acc_per_epoch": [e["val_acc"] for e in progress.epochs_log]}
            if variant == "resconv":
                record["gamma_mean"], record["gamma_min"] = sum(gammas) / len(gammas), min(gammas)
            records.append(record)
            rows.append([arch, variant, converted, f"{record['top1']:.2f}", f"{record['train_loss']:.3f}",
                         f"{flops.total / 1e6:.2f}", f"{flops.params / 1e3:.1f}",
                         " / ".join(f"{a:.1f}" for a in record["val_acc_per_epoch"])])
            print(json.dumps(record), flush=True)
    summary = {"benchmark": name, "top1": {f"{r['arch']}_{r['variant']}": round(r["top1"], 2) for r in records}}
    write_results(name, {"environment": environment(), "args": vars(args), "records": records, "summary": summary},
                  ["arch", "variant", "ResConv layers", "top-1 % (after fusion)", "last-epoch train loss",
                   "MFLOPs (fused)", "params (k)", "test top-1 per epoch"], rows,
                  notes=f"{args.epochs} epochs on {args.train_subset or 60000} Fashion-MNIST training images, seed "
                        f"{args.seed}, lr {args.lr}, ResConv gates initialised at {args.init_gamma}; top-1 on the "
                        "10,000 test images. FLOPs / params: deployed form (every BN folded); the fused ResConv "
                        "network's equal the plain one's.")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
