"""Exploration for benchmark 8: cifar_resnet56 depth pruning at 0.6 of the latency with another fine-tuning rate.

At the grid's (and the command's) default fine-tuning rate, 0.02, the cifar_resnet56 depth row diverged in its first
fine-tuning steps (92.33% after removal, 36.96% after fine-tuning). This runs the same row (``equal_latency.py``'s
depth configuration: latency_reduction 0.4, 3 + 3 epochs on 20,000 images, distillation, the command's defaults)
with ``--finetune-lr`` LR and writes one JSON file to benchmarks/results/equal_latency_exploration/ (not part of the
grid: the channel rows keep lr 0.02).

Usage: python benchmarks/explorations/explore_finetune_lr.py LR SEED   (one thread; about 40 minutes on this 2-core CPU)
"""
import sys, json, time
sys.path.insert(0, "benchmarks")
import torch
torch.set_num_threads(1)
import resconv_plugin
from resconv_plugin.data import build_datasets
from resconv_plugin.workflow import CompressionConfig, compress, evaluate
import equal_latency as el
from common import environment, write_json
lr = float(sys.argv[1]); seed = int(sys.argv[2])
data = build_datasets("fashion-mnist", train_subset=20000)
base = resconv_plugin.load(el.BASELINES / "cifar_resnet56_fmnist.safetensors").eval()
base_top1 = evaluate(base, data)
start = time.time()
out = f"runs/explore/cifar_resnet56-depth-t0.6-s{seed}-ftlr{lr}"
config = CompressionConfig(model="cifar_resnet56", epochs=0, latency_reduction=0.4, channel_pruning=0.0,
                           sparsity_epochs=3, finetune_epochs=3, finetune_lr=lr, train_subset=20000, seed=seed,
                           output=out, latency_repeats=30, plots=False, progress=False)
report = compress(config, data=data, model=base)
model = resconv_plugin.load(f"{out}/model.safetensors")
plain_base = resconv_plugin.deployed(base)
rec = {"arch": "cifar_resnet56", "method": "depth", "target": 0.6, "seed": seed, "finetune_lr": lr,
       "top1": evaluate(model, data), "baseline_top1": base_top1, "latency_rel": el.latency_rel(model, plain_base, 30),
       "flops_rel": resconv_plugin.count_flops(resconv_plugin.deployed(model), el.EXAMPLE).total
       / resconv_plugin.count_flops(plain_base, el.EXAMPLE).total,
       "removed": report["removed"], "latency_fit": report.get("latency_fit"), "epochs": report["epochs"],
       "train_subset": 20000, "sparsity_epochs": 3, "finetune_epochs": 3, "minutes": (time.time() - start) / 60,
       "environment": environment()}
write_json(el.RESULTS / "equal_latency_exploration" / f"cifar_resnet56-depth-t0.6-s{seed}-ftlr{lr}.json", rec)
print(json.dumps({k: rec[k] for k in ("top1", "baseline_top1", "latency_rel", "flops_rel", "minutes")}))
