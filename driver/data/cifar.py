"""CIFAR-10 from its python batches (torchvision's CIFAR10, md5-checked), the held-out split,
GCN + ZCA."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from driver.data.common import DataError, DatasetSplits, TensorImages

if TYPE_CHECKING:
    from driver.config.data import DataConfig

log = logging.getLogger(__name__)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ZCA_EPS = 1e-2
ZCA_MAX_FIT = 10_000
_LAYOUT = (
    f"data.root must hold {CIFAR10.base_folder}/ with data_batch_1..5, test_batch and "
    f"batches.meta, as extracted from {CIFAR10.filename}"
)
_MISSING_FIX = (
    "download them with data.download = true, "
    f"or point data.root at the folder that holds {CIFAR10.base_folder}"
)
_CORRUPT_FIX = "delete it and re-run with data.download = true to fetch a fresh copy"


def _files() -> list[tuple[str, str]]:
    """(file name, md5) of every file torchvision's CIFAR10 checks, batches first."""
    named = [(name, md5) for name, md5 in CIFAR10.train_list + CIFAR10.test_list]
    return [*named, (CIFAR10.meta["filename"], CIFAR10.meta["md5"])]


def cifar_missing(folder: Path) -> str | None:
    """Which files of a ``cifar-10-batches-py`` folder are absent, as one line with the fix, or
    None (nothing is read: the service's admission asks this)."""
    names = [name for name, _ in _files()]
    if not folder.is_dir() or not any((folder / n).is_file() for n in names[:-1]):
        where = f"under {folder} (looked for data_batch_1..5, test_batch)"
        return f"cifar10: no CIFAR-10 batches {where}; {_MISSING_FIX}"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        return f"cifar10: missing {', '.join(missing)} under {folder}; {_MISSING_FIX}"
    return None


def cifar_corrupt(folder: Path) -> str | None:
    """The first file of the folder whose md5 is not the published one (the check torchvision's
    CIFAR10 makes, file by file, through its public check_integrity), as one line, or None."""
    for name, md5 in _files():
        if not check_integrity(str(folder / name), md5):
            return (
                f"cifar10: {folder / name} is not the published CIFAR-10 file (its md5 differs: "
                f"truncated, altered or from another dataset); {_LAYOUT}; {_CORRUPT_FIX}"
            )
    return None


def _read(root: str, *, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (uint8 N x 3 x 32 x 32, int64 N), or DataError naming the file and the fix."""
    folder = Path(root) / CIFAR10.base_folder
    absent = None if download else cifar_missing(folder)
    if absent:
        raise DataError(absent)
    try:
        ds = CIFAR10(root, train=train, download=download)
    except OSError as err:  # network or disk failure while downloading
        raise DataError(
            f"cifar10: download of {CIFAR10.url} into {root} failed ({err}); "
            f"check the network, or {_MISSING_FIX}"
        ) from err
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted" (md5 check)
        raise DataError(
            cifar_missing(folder) or cifar_corrupt(folder) or f"cifar10: {err}; {_LAYOUT}"
        ) from err
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return images, torch.tensor(ds.targets, dtype=torch.long)


def _gcn(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation: each image to zero mean and unit standard deviation."""
    flat = x.reshape(len(x), -1).float() / 255.0
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.std(dim=1, keepdim=True).clamp_min(1e-8)


class ZCA:
    """ZCA whitening ``W = V diag(1/sqrt(lam + eps)) V^T`` (null space scaled by 1/sqrt(eps))."""

    def __init__(self, train: torch.Tensor, eps: float = ZCA_EPS) -> None:
        if len(train) > ZCA_MAX_FIT:  # a fixed, evenly spaced subset bounds the fit's cost
            train = train[torch.linspace(0, len(train) - 1, ZCA_MAX_FIT).long()]
        train = train.double()  # fit in float64, apply in float32
        mean = train.mean(dim=0)
        _, s, vh = torch.linalg.svd(train - mean, full_matrices=False)
        lam = s**2 / len(train)
        self.scale = eps**-0.5
        self.mean, self.v = mean.float(), vh.T.float().contiguous()
        self.coef = ((lam + eps).rsqrt() - self.scale).float()

    def __call__(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32)
        for i in range(0, len(x), chunk):
            xc = x[i : i + chunk].float() - self.mean
            out[i : i + chunk] = xc * self.scale + ((xc @ self.v) * self.coef) @ self.v.T
        return out


class Normalise:
    """uint8 image -> float32 in [0, 1] -> per-channel standardised with the CIFAR-10 statistics."""

    def __init__(self) -> None:
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float() / 255.0 - self.mean) / self.std


def load_cifar10(cfg: DataConfig) -> DatasetSplits:
    """Train: data_batch_1..5 less the last ``val_size`` images (val); test: test_batch.

    A ``train_size`` keeps a class-balanced, seeded subset of the training images (0: all).
    """
    from driver.data.split import split_train

    x, y = _read(cfg.root, train=True, download=cfg.download)
    x_test, y_test = _read(cfg.root, train=False, download=False)
    where = f"the batches under {Path(cfg.root) / CIFAR10.base_folder}"
    n_train, keep = split_train(y.numpy(), cfg, where)
    parts = {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:], y[n_train:])}
    if keep is not None:
        parts["train"] = (x[torch.from_numpy(keep)], y[torch.from_numpy(keep)])
    parts["test"] = (x_test, y_test)
    aug = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    if cfg.whiten:
        zca = ZCA(_gcn(parts["train"][0]))
        out = {k: TensorImages(zca(_gcn(a)).view(-1, 3, 32, 32), b) for k, (a, b) in parts.items()}
        if cfg.augment:
            out["train"].transform = aug
    else:
        norm = Normalise()
        out = {k: TensorImages(a, b, norm) for k, (a, b) in parts.items()}
        if cfg.augment:
            out["train"].transform = v2.Compose([aug, norm])
    log.info("cifar10: train %d, val %d, test %d", len(out["train"]), cfg.val_size, len(x_test))
    return DatasetSplits(**out, input_shape=(3, 32, 32), num_classes=10)
