"""The joint pruner's plan alone, as ``benchmarks/equal_latency.py``'s joint rows made it: which split it chose and
how it scored each, without the training that follows.

Written for the split-share ``JointPruner`` that ``JointPlanner`` replaced (commit e8d4e8e); it does not run
against the planner (no ``joint_recovery_fade``, other candidates) and stays as the record of its rows.

For one arch, latency target and seed: ``resconv_plugin.workflow.compress`` with ``channel_pruning="auto"``,
``latency_reduction = 1 - target``, the command's defaults and the equal-latency grid's data (20,000 training
images, the committed baseline), but 0 sparsity and 0 fine-tuning epochs: the convert stage's ``JointPruner.plan()``
(each candidate trained ``--joint-recovery-steps`` distilled steps, then scored on the calibration batch) is the same
computation as a grid row's. Used to check a change to the plan (e.g. the recovery warm-up) against the plans the
grid's rows recorded, without their 50 minutes of training on cifar_resnet56.

One JSON file per (arch, target, seed) under ``benchmarks/results/joint_plan_check_rows/`` (``--results-name``):
every candidate (depth share, layers removed, channel ratio, latency, score after recovery, one-shot score), the
choice, the minutes the plan took, and the environment; a finished file is not redone.

Usage: python benchmarks/explorations/joint_plan_check.py --arch cifar_resnet56 --target 0.6 --seed 1 [--threads 1]
       [--joint-recovery-fade F] [--recovery-lr LR] [--results-name NAME]  (variants of the plan's recovery steps:
       give each its own NAME, rows in benchmarks/results/NAME_rows/, runs in runs/NAME/)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

import resconv_plugin
from resconv_plugin.data import build_datasets
from resconv_plugin.workflow import CompressionConfig, compress
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common.py
from common import RESULTS, environment, write_json  # noqa: E402

BASELINES = Path(__file__).resolve().parent.parent / "baselines"


def finite(x):
    return x if isinstance(x, float) and math.isfinite(x) else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet56")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--joint-recovery-fade", type=float, default=0.0,
                        help="CompressionConfig.joint_recovery_fade (share of the recovery steps fading the layers)")
    parser.add_argument("--recovery-lr", type=float, default=CompressionConfig.finetune_lr,
                        help="the recovery steps' learning rate (the pipeline's --finetune-lr, and its default)")
    parser.add_argument("--results-name", default="joint_plan_check")
    parser.add_argument("--runs", default=None, help="the runs' folders (resumable; default runs/RESULTS_NAME)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.results_name}_rows" / f"{args.arch}-t{args.target}-s{args.seed}.json"
    if path.exists():
        print(f"{path} exists: not redone")
        return
    data = build_datasets("fashion-mnist", train_subset=args.train_subset)
    base = resconv_plugin.load(BASELINES / f"{args.arch}_fmnist.safetensors")
    start = time.time()
    # the run resumes from here: a plan that finished is not measured again
    out = Path(args.runs or f"runs/{args.results_name}") / f"{args.arch}-t{args.target}-s{args.seed}"
    config = CompressionConfig(model=args.arch, epochs=0, latency_reduction=round(1 - args.target, 6),
                               channel_pruning="auto", sparsity_epochs=0, finetune_epochs=0,
                               train_subset=args.train_subset, seed=args.seed, output=out,
                               latency_repeats=args.repeats, plots=False, progress=False,
                               joint_recovery_fade=args.joint_recovery_fade, finetune_lr=args.recovery_lr)
    plan = compress(config, data=data, model=base)["joint_plan"]
    record = {"arch": args.arch, "target": args.target, "seed": args.seed,
              "chosen": plan["best"]["depth_share"],
              "candidates": [{"depth_share": c["depth_share"], "layers": len(c["depth_names"]),
                              "channel_ratio": c["channel_ratio"], "cost_rel": c["cost_rel"],
                              "score": finite(c["score"]), "oneshot_score": finite(c["oneshot_score"]),
                              "recovery_steps": c["recovery_steps"], "depth_names": c["depth_names"]}
                             for c in plan["candidates"]],
              "unreachable": plan["unreachable"], "joint_recovery_fade": args.joint_recovery_fade,
              "recovery_lr": args.recovery_lr,
              "minutes": (time.time() - start) / 60,
              "command": f"python benchmarks/explorations/joint_plan_check.py --arch {args.arch} --target {args.target} "
                         f"--seed {args.seed} --threads {args.threads}"
                         + (f" --joint-recovery-fade {args.joint_recovery_fade}" if args.joint_recovery_fade else "")
                         + (f" --recovery-lr {args.recovery_lr}" if args.recovery_lr != CompressionConfig.finetune_lr
                            else "")
                         + (f" --results-name {args.results_name}" if args.results_name != "joint_plan_check" else ""),
              "environment": environment()}
    write_json(path, record)
    for c in record["candidates"]:
        print(f"share {c['depth_share']:.2f}: {c['layers']} layers + ratio {c['channel_ratio']:.3f} -> "
              f"{c['cost_rel']:.3f}, score {c['score']} (one-shot {c['oneshot_score']})")
    print(f"chosen: depth share {record['chosen']}; {record['minutes']:.1f} min")


if __name__ == "__main__":
    main()
