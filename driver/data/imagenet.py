"""ImageNet from class-folder JPEGs (``root/train``, ``root/val``) with the standard transforms."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from driver.data.common import DataError, DatasetSplits

if TYPE_CHECKING:
    from driver.config.data import DataConfig

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HOLDOUT_FRACTION = 0.02
_FIX = "point data.root at a folder holding train/<class>/*.JPEG and val/<class>/*.JPEG"


def check_split(folder: Path) -> list[str]:
    """The class folder names of one split, or DataError naming the folder and the fix."""
    if not folder.is_dir():
        raise DataError(f"imagenet: no folder {folder}; {_FIX}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(
            f"imagenet: {folder} has no class folders (images must sit in {folder}/<class>/, "
            f"e.g. sort the val JPEGs into wnid folders); {_FIX}"
        )
    for name in classes:
        with os.scandir(folder / name) as entries:
            if not any(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries if e.is_file()):
                raise DataError(
                    f"imagenet: class folder {folder / name} has no images "
                    f"(looked for {', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
                )
    return classes


class Transformed(Dataset):
    """Items ``(transform(image), label)`` of ``base`` at ``indices`` (an ImageFolder's samples)."""

    def __init__(self, base: ImageFolder, indices: list[int], transform: Callable[[Any], Any]):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[index]]
        return self.transform(image), int(label)


def _holdout(targets: list[int]) -> tuple[list[int], list[int]]:
    """Deterministic per-class split: 2% of each class (at least 1 when it has 2+) held out."""
    rng = np.random.default_rng(0)
    labels = np.asarray(targets)
    train: list[int] = []
    held: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(HOLDOUT_FRACTION * len(idx))) if len(idx) > 1 else 0
        pick = np.zeros(len(idx), dtype=bool)
        pick[rng.choice(len(idx), size=k, replace=False)] = True
        held += idx[pick].tolist()
        train += idx[~pick].tolist()
    return sorted(train), sorted(held)


def transforms(image_size: int, *, augment: bool) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms from a PIL image to a normalised float32 tensor."""
    tail = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
        v2.ToPureTensor(),
    ]
    resize = [v2.Resize(int(image_size * 256 / 224)), v2.CenterCrop(image_size)]
    eval_tf = v2.Compose([*resize, *tail])
    if not augment:
        return eval_tf, eval_tf
    random = [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]
    return v2.Compose([*random, *tail]), eval_tf


def load_imagenet(cfg: DataConfig) -> DatasetSplits:
    """Train = root/train minus a 2% per-class hold-out (val), test = root/val."""
    root = Path(cfg.root)
    classes = check_split(root / "train")
    val_classes = check_split(root / "val")
    if val_classes != classes:
        odd = sorted(set(classes).symmetric_difference(val_classes))[:3]
        raise DataError(
            f"imagenet: class folders of {root / 'val'} differ from {root / 'train'} "
            f"(e.g. {', '.join(odd)}); give both splits the same <class> folders"
        )
    train_base, test_base = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    train_idx, held_idx = _holdout(train_base.targets)
    train_tf, eval_tf = transforms(cfg.image_size, augment=cfg.augment)
    log.info(
        "imagenet: %d classes; train %d, val %d, test %d",
        len(classes),
        len(train_idx),
        len(held_idx),
        len(test_base),
    )
    return DatasetSplits(
        train=Transformed(train_base, train_idx, train_tf),
        val=Transformed(train_base, held_idx, eval_tf),
        test=Transformed(test_base, list(range(len(test_base))), eval_tf),
        input_shape=(3, cfg.image_size, cfg.image_size),
        num_classes=len(classes),
    )
