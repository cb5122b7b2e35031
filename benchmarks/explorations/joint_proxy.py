"""Does a short distilled training rank the joint pruner's candidate splits as the full schedule did?

The exploration behind ``JointPruner(recovery_steps=...)`` (benchmarks/results/joint_proxy.md). For one latency target
on cifar_resnet20 (the committed Fashion-MNIST baseline), ``JointPruner.plan()`` (one-shot) builds the five candidate
splits; each candidate is then trained with SGD (momentum 0.9, weight decay 5e-4, constant lr 0.02, batch 128,
distilled alpha 0.5 T 4) on 20,000 training images, and after 50 / 100 / 200 / 300 steps read three ways: ``raw``:
task loss on the 256-image calibration batch as deployed (its own BatchNorm statistics); ``s``: the one-shot proxy
(lower of as-is and BatchNorm re-estimated on that batch); ``acc``: top-1 on 2,000 test images (for this
exploration only, never for a choice).

Usage: python benchmarks/explorations/joint_proxy.py TARGET STEPS (e.g. 0.45 50,100,200,300); one JSON line per candidate.
Seeded (the batches and the calibration batch); the plan's latencies are measured, so its channel ratios vary.
"""
import copy, sys, time, json, itertools
from pathlib import Path
import torch
import resconv_plugin
from resconv_plugin.data import build_datasets, calibration_batch, BatchLoader
from resconv_plugin.pruning import JointPruner, calibration_loss
from resconv_plugin.distill import DistillationLoss
from resconv_plugin.workflow import evaluate
torch.set_num_threads(1)
target = float(sys.argv[1]); steps_list = [int(s) for s in sys.argv[2].split(",")]
data = build_datasets("fashion-mnist", train_subset=20000, val_subset=2000)
base = resconv_plugin.load(Path(__file__).resolve().parent.parent / "baselines" / "cifar_resnet20_fmnist.safetensors").eval()
x1 = torch.zeros(1, 1, 28, 28)
calib = calibration_batch(data, 256, seed=0)
model = copy.deepcopy(base); resconv_plugin.convert(model, x1)
t = time.time()
jp = JointPruner(model, x1, 1 - target, calibration_inputs=calib[0], calibration_targets=calib[1], cost="latency")
plan = jp.plan()
print("plan", round(time.time() - t), "s", flush=True)
loss_fn = DistillationLoss(base, alpha=0.5, temperature=4.0)
for c in plan.candidates:
    m = jp.apply(c)
    row = {"share": c.depth_share, "layers": len(c.depth_names), "ratio": round(c.channel_ratio, 3), "cost": round(c.cost_rel, 3), "oneshot": round(c.score, 3)}
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(data, True, 128, seed=0)
    batches = itertools.chain.from_iterable(iter(loader) for _ in range(100))
    done = 0; t = time.time()
    for n in steps_list:
        m.train()
        while done < n:
            x, y = next(batches)
            loss = loss_fn(m(x), y, x); opt.zero_grad(); loss.backward(); opt.step(); done += 1
        m.eval()
        with torch.no_grad():
            row[f"raw{n}"] = round(calibration_loss(m(calib[0]), calib[1]), 3)
        row[f"s{n}"] = round(jp.score(m), 3); row[f"acc{n}"] = round(evaluate(m, data), 2)
    row["train_s"] = round(time.time() - t)
    print(json.dumps(row), flush=True)
