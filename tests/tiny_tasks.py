"""A tiny real task for sparsity training: tell horizontal from vertical stripes.

A 3x3 conv is needed (orientation is invisible to 1x1 convs and global pooling); a 1x1 conv layer is useless.
"""

import torch
import torch.nn.functional as F
from torch import nn


def stripes(n: int, size: int = 12, seed: int = 0):
    """``n`` noisy stripe images (1 x size x size), label 0 = horizontal, 1 = vertical."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    period = torch.randint(2, 5, (n,), generator=g).float()
    phase = torch.rand(n, generator=g) * 6.2832
    wave = torch.sin(6.2832 * torch.arange(size).float()[None, :] / period[:, None] + phase[:, None])
    rows = wave[:, :, None].expand(n, size, size)
    cols = wave[:, None, :].expand(n, size, size)
    img = torch.where(label[:, None, None] == 0, rows, cols) + 0.3 * torch.randn(n, size, size, generator=g)
    return img[:, None], label


def _unit(kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 8, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(8), nn.ReLU())


class StripesNet(nn.Module):
    """stem (1x1, 1 -> 8) -> [needed 3x3 | useless 1x1] in the given order -> global mean -> linear."""

    def __init__(self, useless_first: bool):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.needed, self.useless = _unit(3), _unit(1)
        self.useless_first = useless_first
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.needed(self.useless(x)) if self.useless_first else self.useless(self.needed(x))
        return self.head(x.mean((2, 3)))


def train(model, pruner, optimizer, x, y, steps: int, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.regularize(model)
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()
