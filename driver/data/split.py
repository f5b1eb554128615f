"""How a train file is split into train and validation, and a class-balanced subset."""

from __future__ import annotations

import numpy as np

from driver.config.data import DataConfig
from driver.data.common import DataError


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
