"""Exploration for benchmark 8: which training rate suits meta_taylor (MetaPruner + GroupTaylorImportance, pruned
first, then trained for the grid's 3 + 3 epochs)? Prunes cifar_resnet20's converged baseline at a FIXED channel ratio
(no latency bisection, so the rates are compared on one structure) and trains it as ``equal_latency.py`` does
(distilled alpha 0.5 T 4, cosine, weight decay 5e-4, batch 128, 20,000 images, seed + 2) at each rate; appends one
JSON line per (ratio, rate) to OUT.

Usage: python benchmarks/explorations/explore_channel_finetune_rates.py SEED OUT RATIO[,RATIO...] LR [LR ...]   (one thread)
"""
import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
torch.set_num_threads(1)
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
import resconv_plugin  # noqa: E402
import equal_latency as el  # noqa: E402
from resconv_plugin.data import build_datasets, calibration_batch  # noqa: E402
from resconv_plugin.workflow import evaluate, train_stage  # noqa: E402

seed, out, ratios, lrs = int(sys.argv[1]), sys.argv[2], [float(r) for r in sys.argv[3].split(",")], \
    [float(x) for x in sys.argv[4:]]
data = build_datasets("fashion-mnist", train_subset=20000)
base = resconv_plugin.load(el.BASELINES / "cifar_resnet20_fmnist.safetensors").eval()
calib = calibration_batch(data, 256, seed=seed)
base_flops = resconv_plugin.count_flops(resconv_plugin.deployed(base), el.EXAMPLE).total
for ratio in ratios:
    for lr in lrs:
        start = time.time()
        model = el.prune_channels(base, "meta_taylor", ratio, calib)
        flops_rel = resconv_plugin.count_flops(resconv_plugin.deployed(model), el.EXAMPLE).total / base_flops
        progress = train_stage(model, data, el.settings("meta_taylor finetune", 6, seed + 2, lr), teacher=base)
        rec = {"arch": "cifar_resnet20", "method": "meta_taylor", "seed": seed, "channel_ratio": ratio, "lr": lr,
               "top1": evaluate(model.eval(), data), "flops_rel": flops_rel, "restarts": progress.restarts,
               "epochs": [[round(e["train_loss"], 4), e["val_acc"]] for e in progress.epochs_log],
               "seconds": round(time.time() - start)}
        print(json.dumps(rec), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
