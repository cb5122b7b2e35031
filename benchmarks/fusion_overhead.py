"""Fusion overhead: a converted-then-fused model against the same architecture built plain, and the cost of
sparsity training (the unfused ResConv model's training step against the plain model's).

For each architecture (random weights, random BatchNorm statistics and gates: latency and FLOPs do not depend on
them):
* plain: ``timm.create_model(arch)`` with every BatchNorm folded (``fold_batchnorms``): the deployed network.
* fused: the same model ``convert``-ed (a ResConv on every eligible conv, random gates), ``fuse``-d, remaining
  BatchNorms folded.
Figures:
* FLOPs / params: resconv_plugin fvcore count at batch 1 (must be identical: fusion leaves nothing behind).
* inference latency: median ms of one forward (eval, no_grad), both models timed in turns (rotating order, warm-up 3,
  --repeats rounds) at batch 1 and 32; ratio = fused / plain (1.0 = no overhead).
* training step: median ms of forward + cross-entropy + backward + SGD step (train mode, batch --train-batch), the
  plain model (BatchNorm not folded) against the unfused ResConv model, timed in turns; ratio = ResConv / plain.

Usage: python benchmarks/fusion_overhead.py [--quick] [--archs ...] [--repeats 30]
Ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import timm
import torch

import resconv_plugin
from resconv_plugin import interleaved_latencies
from resconv_plugin.testing import randomize_bn, randomize_gates
from common import environment, write_results

ARCHS = {"cifar_resnet56": (32, 10), "resnet18": (224, 1000), "efficientnet_b0": (224, 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--size", type=int, help="input side for the ImageNet models (default 224)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="cifar_resnet56 and resnet18 at 64 px, 10 repeats")
    args = parser.parse_args()
    name = "fusion_overhead"
    if args.quick:
        args.archs, args.size, args.repeats, args.train_repeats, name = ["cifar_resnet56", "resnet18"], 64, 10, 5, \
            "fusion_overhead_quick"
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    records, rows = [], []
    for arch in args.archs:
        size, classes = ARCHS[arch]
        size = size if arch.startswith("cifar") or not args.size else args.size
        x1 = torch.randn(1, 3, size, size)
        base = randomize_bn(timm.create_model(arch, num_classes=classes))
        plain = copy.deepcopy(base).eval()
        resconv_plugin.deploy.fold_batchnorms(plain)
        converted = copy.deepcopy(base)
        report = resconv_plugin.convert(converted, x1)
        randomize_gates(converted)
        fused = resconv_plugin.fuse(converted.eval())
        resconv_plugin.deploy.fold_batchnorms(fused)
        fp, ff = resconv_plugin.count_flops(plain, x1), resconv_plugin.count_flops(fused, x1)
        record = {"arch": arch, "input": size, "converted_layers": len(report.converted), "flops_plain": fp.total,
                  "flops_fused": ff.total, "params_plain": fp.params, "params_fused": ff.params,
                  "same_module_types": [type(m).__name__ for m in plain.modules()]
                  == [type(m).__name__ for m in fused.modules()]}
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size)
            lat = interleaved_latencies({"plain": lambda: plain(x), "fused": lambda: fused(x)},
                                        repeats=args.repeats)
            record[f"ms_b{batch}_plain"], record[f"ms_b{batch}_fused"] = 1e3 * lat["plain"], 1e3 * lat["fused"]
            record[f"ratio_b{batch}"] = lat["fused"] / lat["plain"]
        # training step: plain (with BN, as trained) against the unfused ResConv model
        steps = {}
        for key, model in (("plain", copy.deepcopy(base).train()), ("resconv", copy.deepcopy(converted).train())):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            xb = torch.randn(args.train_batch, 3, size, size)
            yb = torch.randint(0, classes, (args.train_batch,))

            def step(model=model, opt=opt, xb=xb, yb=yb):
                with torch.enable_grad():
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            steps[key] = step
        train = interleaved_latencies(steps, repeats=args.train_repeats, warmup=2)
        record["train_ms_plain"], record["train_ms_resconv"] = 1e3 * train["plain"], 1e3 * train["resconv"]
        record["train_ratio"] = train["resconv"] / train["plain"]
        records.append(record)
        rows.append([arch, size, record["converted_layers"], f"{fp.total / 1e6:.2f}", f"{ff.total / 1e6:.2f}",
                     fp.params == ff.params, record["same_module_types"],
                     f"{record['ms_b1_plain']:.2f} / {record['ms_b1_fused']:.2f} ({record['ratio_b1']:.3f})",
                     f"{record['ms_b32_plain']:.1f} / {record['ms_b32_fused']:.1f} ({record['ratio_b32']:.3f})",
                     f"{record['train_ms_plain']:.0f} / {record['train_ms_resconv']:.0f} "
                     f"({record['train_ratio']:.2f})"])
        print(json.dumps({k: v for k, v in record.items() if k != "same_module_types" or True}), flush=True)
    summary = {"benchmark": name, "flops_identical": all(r["flops_plain"] == r["flops_fused"] for r in records),
               "params_identical": all(r["params_plain"] == r["params_fused"] for r in records),
               "inference_ratio_b1": {r["arch"]: round(r["ratio_b1"], 4) for r in records},
               "inference_ratio_b32": {r["arch"]: round(r["ratio_b32"], 4) for r in records},
               "train_step_ratio": {r["arch"]: round(r["train_ratio"], 3) for r in records}}
    write_results(name, {"environment": environment(), "records": records, "summary": summary, "args": vars(args)},
                  ["arch", "input", "ResConv layers", "MFLOPs plain", "MFLOPs fused", "params equal",
                   "same module types", "ms b1 plain / fused (ratio)", "ms b32 plain / fused (ratio)",
                   f"train step ms b{args.train_batch} plain / ResConv (ratio)"], rows,
                  notes=f"Median of {args.repeats} interleaved rounds (inference) and {args.train_repeats} (training "
                        "step); plain = timm model with every BatchNorm folded; fused = converted, fused, remaining "
                        "BatchNorms folded; train step = forward + cross-entropy + backward + SGD, train mode.")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
