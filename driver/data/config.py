"""The data section of the config (`[data]`), and how a train file is split into train and
validation (and a class-balanced subset)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from driver.data.common import DataError

DATASETS = ("digits", "cifar10", "fashion_mnist", "mnist", "imagenet", "synthetic")
HELD_OUT = ("cifar10", "fashion_mnist", "mnist")  # val = the last data.val_size of the train file


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
