"""Demo: build a timm model, convert it to ResConv, fuse it back, and show FLOPs, parameters and exactness.

Steps: create -> count FLOPs (original) -> convert -> count FLOPs (converted: the gates cost a little) -> give the
gates and BatchNorm statistics values like after training (random, seeded) -> fuse -> count FLOPs (fused: the same
as the original minus the folded BatchNorms) -> compare fused and converted outputs.

Usage: python examples/convert_and_fuse.py [--model resnet18] [--size 224] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings

import timm
import torch

import resconv_plugin
from resconv_plugin.workflow.report import format_table


BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int) -> None:
    """Gates in [0, 1] and BatchNorm statistics away from their defaults, as a trained model would have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, resconv_plugin.ResConv):
            m.gamma.fill_(torch.rand((), generator=g).item())
        elif isinstance(m, BATCHNORMS) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="any timm CNN name (default: resnet18)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default: 224)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, num_classes=1000).eval()
    x = torch.randn(1, 3, args.size, args.size)
    original = resconv_plugin.count_flops(model, x)
    stages = [("original", original, 0)]

    t0 = time.perf_counter()
    report = resconv_plugin.convert(model, x)
    t_convert = time.perf_counter() - t0
    print(report if len(report.converted) + len(report.skipped) <= 60 else report.__str__().split("\n\n")[0])
    stages.append(("converted", resconv_plugin.count_flops(model, x), len(resconv_plugin.deploy.resconv_layers(model))))

    trained_like(model, args.seed)
    t0 = time.perf_counter()
    fused = resconv_plugin.fuse(model)
    t_fuse = time.perf_counter() - t0
    after = resconv_plugin.count_flops(fused, x)
    stages.append(("fused", after, len(resconv_plugin.deploy.resconv_layers(fused))))
    with torch.no_grad():
        y_converted, y_fused = model(x), fused(x)
    diff = (y_fused - y_converted).abs().max().item()

    print(f"\n{args.model} at 1x3x{args.size}x{args.size}: FLOPs (one multiply-add = 1 flop) and parameters")
    rows = [(stage, f"{r.total / 1e6:,.2f}M", f"{r.params / 1e6:,.3f}M", n, sum(r.unsupported.values()))
            for stage, r, n in stages]
    print(format_table(["stage", "FLOPs", "params", "ResConv layers", "uncounted ops"], rows))
    print(f"\nfused vs converted output, gates and BN statistics randomised: max |diff| = {diff:.2e} "
          f"(output scale {y_converted.abs().max().item():.2f}, relative {diff / y_converted.abs().max().item():.1e})")
    print(f"convert took {t_convert:.3f}s, fuse took {t_fuse:.3f}s")
    print("\nper-layer FLOPs after fusion (first 8 layers in module order):")
    print(after.table(max_rows=8))


if __name__ == "__main__":
    main()
