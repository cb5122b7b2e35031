"""Exploration for benchmark 8: which fine-tuning rate (and warm-up) suits a depth-pruned model? Runs equal_latency's
depth row configuration (ARCH, latency_reduction RED, --seed, 3 sparsity epochs on 20,000 images) up to the
fine-tuning stage with the pipeline's public stage methods, keeps the unfused pruned model
(runs/explore/<ARCH>_r<RED>[_s<SEED>]_prefinetune.pt, reused by later calls), then fine-tunes copies of it for each
VARIANT exactly as the pipeline's finetune stage does (3 epochs, distilled alpha 0.5 T 4, cosine, weight decay 5e-4,
batch 128, stage seed SEED + 5) and appends one JSON line per variant to OUT (top-1 before and after, each epoch's
train loss and validation top-1, the divergence guard's restarts, seconds).

VARIANT: LR or LR:WARMUP_EPOCHS (linear warm-up, timm's, before the cosine). --guard: the divergence guard as the
command has it (StageSettings' default; each restart logged in the line); without it, off.

Usage: python benchmarks/explorations/explore_finetune_rates.py ARCH RED OUT VARIANT [VARIANT ...] [--seed S] [--guard]
(one thread)
Results: benchmarks/results/equal_latency_exploration/ (README.md there: commands and findings).
"""
import argparse
import json
import os
import time

import torch

import resconv_plugin
from resconv_plugin.data import build_datasets
from resconv_plugin.workflow import (CompressionConfig, Dist, Pipeline, STAGES, StageSettings, evaluate,
                                     finetune)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("arch")
parser.add_argument("red", type=float)
parser.add_argument("out")
parser.add_argument("variants", nargs="+")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--guard", action="store_true")
args = parser.parse_args()
torch.set_num_threads(1)
variants = [(float(v.split(":")[0]), int(v.split(":")[1]) if ":" in v else 0) for v in args.variants]
data = build_datasets("fashion-mnist", train_subset=20000)
base = resconv_plugin.load(f"benchmarks/baselines/{args.arch}_fmnist.safetensors").eval()
tag = f"{args.arch}_r{args.red}" + (f"_s{args.seed}" if args.seed else "")
pre = f"runs/explore/{tag}_prefinetune.pt"
if not os.path.exists(pre):
    cfg = CompressionConfig(model=args.arch, epochs=0, latency_reduction=args.red, sparsity_epochs=3,
                            finetune_epochs=3, train_subset=20000, seed=args.seed,
                            output=f"runs/explore/sweep_{tag}", latency_repeats=30, plots=False, progress=False)
    p = Pipeline(cfg.validated(1), Dist(), data, base)
    state = p.run_state.state
    for name in STAGES:
        if name == "finetune":
            break
        getattr(p, name)()
        state["done"].append(name)
    os.makedirs(os.path.dirname(pre), exist_ok=True)
    torch.save(p.model, pre + ".tmp")
    os.replace(pre + ".tmp", pre)
    print("removed", len(state["removed"]), "fit", [(r["measured"], len(r["removed"])) for r in
                                                   (state.get("latency_fit") or {}).get("rounds", [])], flush=True)
guard = CompressionConfig().divergence_factor if args.guard else None
for lr, warmup in variants:
    model = torch.load(pre, weights_only=False)
    before, t = evaluate(model, data), time.time()
    p = finetune(model, data, StageSettings(name="finetune", epochs=3, lr=lr, warmup_epochs=warmup,
                                            seed=args.seed + STAGES.index("finetune"), progress=False,
                                            distill_alpha=0.5, divergence_factor=guard), teacher=base)
    rec = {"arch": args.arch, "latency_reduction": args.red, "seed": args.seed, "lr": lr, "warmup_epochs": warmup,
           "guard": guard, "top1_before": before, "top1": evaluate(model, data), "restarts": p.restarts,
           "epochs": [(round(e["train_loss"], 4), e["val_acc"]) for e in p.epochs_log], "s": round(time.time() - t)}
    print(json.dumps(rec), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
