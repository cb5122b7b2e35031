"""Exploration for benchmark 8: which fine-tuning rate suits a depth-pruned model? Runs equal_latency's depth row
configuration (ARCH, latency_reduction RED, seed 0, 3 sparsity epochs on 20,000 images) up to the fine-tuning
stage with the pipeline's public stage methods, keeps the unfused pruned model, then fine-tunes copies of it at each
rate LR exactly as the pipeline's finetune stage does (3 epochs, distilled alpha 0.5 T 4, cosine, weight decay 5e-4,
batch 128, stage seed 5; divergence guard off) and appends one JSON line per rate to OUT.

Usage: python benchmarks/explore_finetune_rates.py ARCH RED OUT LR [LR ...]   (one thread)
Results: benchmarks/results/equal_latency_exploration/finetune_rates_cifar_resnet20.jsonl (2026-11-30: cifar_resnet20,
RED 0.4, 10 layers removed; the run used the same code from /tmp with the pipeline's checks before conversion).
"""
import sys, json, time, os, torch
torch.set_num_threads(1)
import resconv_plugin
from resconv_plugin.data import build_datasets
from resconv_plugin.workflow import CompressionConfig, Dist, Pipeline, StageSettings, finetune, evaluate, STAGES
arch, red, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
lrs = [float(x) for x in sys.argv[4:]]
data = build_datasets("fashion-mnist", train_subset=20000)
base = resconv_plugin.load(f"benchmarks/baselines/{arch}_fmnist.safetensors").eval()
pre = f"runs/explore/{arch}_r{red}_prefinetune.pt"
if not os.path.exists(pre):
    cfg = CompressionConfig(model=arch, epochs=0, latency_reduction=red, sparsity_epochs=3, finetune_epochs=3,
                            train_subset=20000, seed=0, output=f"runs/explore/sweep_{arch}_{red}", latency_repeats=30,
                            plots=False, progress=False)
    p = Pipeline(cfg.validated(1), Dist(), data, base)
    state = p.run_state.state
    for name in STAGES:
        if name == "finetune":
            break
        getattr(p, name)()
        state["done"].append(name)
    os.makedirs(os.path.dirname(pre), exist_ok=True)
    torch.save(p.model, pre)
    print("removed", len(state["removed"]), "fit", [(r["measured"], len(r["removed"])) for r in (state.get("latency_fit") or {}).get("rounds", [])], flush=True)
for lr in lrs:
    model = torch.load(pre, weights_only=False)
    t = time.time()
    p = finetune(model, data, StageSettings(name="finetune", epochs=3, lr=lr, seed=STAGES.index("finetune"),
                                            progress=False, distill_alpha=0.5, divergence_factor=None), teacher=base)
    rec = {"arch": arch, "latency_reduction": red, "lr": lr, "top1": evaluate(model, data),
           "epochs": [(round(e["train_loss"], 4), e["val_acc"]) for e in p.epochs_log], "s": round(time.time() - t)}
    print(json.dumps(rec), flush=True)
    open(out, "a").write(json.dumps(rec) + "\n")
