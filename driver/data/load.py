"""Datasets (digits, CIFAR-10, (Fashion-)MNIST, ImageNet folder, synthetic) and batch loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from driver.data.common import DataError, DatasetSplits, TensorImages

__all__ = ["DATASETS", "DataConfig", "DataError", "DatasetSplits", "load_dataset", "make_loader"]

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "fashion_mnist", "mnist", "imagenet", "synthetic")
HELD_OUT = ("cifar10", "fashion_mnist", "mnist")  # val = the last data.val_size of the train file
DIGITS_HELD = 300  # digits: images in each of val and test (train keeps the other 1,197)
SYNTHETIC_CLASSES = 10
SYNTHETIC_SNR = 1.0  # class-mean amplitude per coarse cell vs unit noise: linear ~75-90% test


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "digits"  # digits | cifar10 | fashion_mnist | mnist | imagenet | synthetic
    root: str = "data"  # holds cifar-10-batches-py, FashionMNIST/raw, MNIST/raw or imagenet
    download: bool = False  # cifar10, (fashion_)mnist: download when asked (never by default)
    val_size: int = 5000  # cifar10, (fashion_)mnist: the last images of train held out for val
    train_size: int = 0  # cifar10, (fashion_)mnist: class-balanced seeded subset of train (0: all)
    augment: bool = False  # random crop + flip (mnist: no flip), train split only; not digits/synth
    whiten: bool = False  # cifar10: GCN + ZCA whitening, fitted on the train split only
    image_size: int = 224  # imagenet: train/eval crop size
    synthetic_size: int = 512  # synthetic: train samples (val and test get a quarter each)
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name: {self.name!r} is not one of {list(DATASETS)}")
        for key in ("download", "augment", "whiten"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"data.{key}: must be true or false, got {getattr(self, key)!r}")
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"data.root: must be a non-empty path, got {self.root!r}")
        minimum = {"val_size": 0, "train_size": 0, "image_size": 8, "synthetic_size": 4}
        minimum |= {"num_workers": 0, "seed": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        shape = self.synthetic_shape
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        ):
            raise ValueError(
                f"data.synthetic_shape: must be 3 positive integers (C, H, W), got {shape!r}"
            )
        object.__setattr__(self, "synthetic_shape", tuple(shape))  # TOML gives a list
        only = {
            "download": HELD_OUT,
            "train_size": HELD_OUT,
            "whiten": ("cifar10",),
            "augment": (*HELD_OUT, "imagenet"),
        }
        for key, names in only.items():
            if getattr(self, key) and self.name not in names:
                raise ValueError(
                    f"data.{key}: only applies to {', '.join(names)}, not {self.name!r}"
                )


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """The train / val / test splits of ``cfg.name``; DataError if it is missing or malformed."""
    if cfg.name == "digits":
        return _load_digits()
    if cfg.name == "synthetic":
        return _load_synthetic(cfg)
    if cfg.name == "cifar10":
        from driver.data.cifar import load_cifar10

        return load_cifar10(cfg)
    if cfg.name in ("fashion_mnist", "mnist"):
        from driver.data.mnist import load_mnist

        return load_mnist(cfg)
    from driver.data.imagenet import load_imagenet

    return load_imagenet(cfg)


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose order (and worker seeds) depend only on ``(seed, epoch)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
        num_workers=num_workers,
        persistent_workers=False,
    )


def split_train(labels: np.ndarray, cfg: DataConfig, where: str) -> tuple[int, np.ndarray | None]:
    """``(n_train, keep)`` for a train file of ``len(labels)`` items, or DataError naming the key.

    Validation is the last ``cfg.val_size`` items, train the ``n_train`` before them; when
    ``cfg.train_size`` is set, ``keep`` is the sorted indices of the training images kept (see
    :func:`balanced_subset`), else None. ``where`` names the file(s) in error messages.
    """
    n_train = len(labels) - cfg.val_size
    if n_train < 1:
        raise DataError(
            f"{cfg.name}: data.val_size = {cfg.val_size} leaves no training images "
            f"({len(labels)} in {where}); lower data.val_size"
        )
    if cfg.train_size > n_train:
        raise DataError(
            f"{cfg.name}: data.train_size = {cfg.train_size} exceeds the {n_train} training images "
            f"left after data.val_size = {cfg.val_size} ({len(labels)} in {where}); "
            "lower data.train_size (0 keeps them all)"
        )
    if not cfg.train_size:
        return n_train, None
    return n_train, balanced_subset(labels[:n_train], cfg.train_size, cfg.seed)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` items spread as evenly over the classes as their counts allow.

    Classes too small for an even share give all they have and the rest is shared out among the
    others; which classes get one more, and which items each class gives, depend only on ``seed``.
    """
    if not 0 <= size <= len(labels):
        raise ValueError(f"size {size} is not in 0..{len(labels)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.zeros_like(counts)
    left = size
    while left > 0:
        spare = np.flatnonzero(quota < counts)
        share = left // len(spare)
        if share == 0:  # fewer left than classes with room: one more each for a seeded few
            quota[rng.choice(spare, size=left, replace=False)] += 1
            break
        add = np.minimum(counts[spare] - quota[spare], share)
        quota[spare] += add
        left -= int(add.sum())
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(k), replace=False)
        for c, k in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *picks]).astype(np.int64))


def _load_digits() -> DatasetSplits:
    """sklearn's 8x8 digits, a fixed stratified 1,197 / 300 / 300 split, train-standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    rest, test = train_test_split(
        idx, test_size=DIGITS_HELD, stratify=digits.target, random_state=0
    )
    train, val = train_test_split(
        rest, test_size=DIGITS_HELD, stratify=digits.target[rest], random_state=0
    )
    train, val, test = (torch.from_numpy(np.sort(i)) for i in (train, val, test))
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return DatasetSplits(
        train=TensorImages(x[train], y[train]),
        val=TensorImages(x[val], y[val]),
        test=TensorImages(x[test], y[test]),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


def _load_synthetic(cfg: DataConfig) -> DatasetSplits:
    """Gaussian classes: a smooth random mean image per class plus unit pixel noise."""
    c, h, w = cfg.synthetic_shape
    gen = torch.Generator().manual_seed(cfg.seed)
    coarse = (min(h, 4), min(w, 4))
    cell = (h * w) / (coarse[0] * coarse[1])  # noise averages down by sqrt(cell) per coarse cell
    means = torch.randn(SYNTHETIC_CLASSES, c, *coarse, generator=gen)
    means = F.interpolate(means, size=(h, w), mode="bilinear", align_corners=False)
    means *= SYNTHETIC_SNR / cell**0.5

    def draw(n: int) -> TensorImages:
        y = torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=gen)
        return TensorImages(means[y] + torch.randn(n, c, h, w, generator=gen), y)

    n = cfg.synthetic_size
    train, val, test = draw(n), draw(n // 4), draw(n // 4)
    return DatasetSplits(
        train=train, val=val, test=test, input_shape=(c, h, w), num_classes=SYNTHETIC_CLASSES
    )
