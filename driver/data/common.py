"""Types shared by the dataset loaders: the error, the splits record and an in-memory dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """A dataset is missing or malformed; the message is one line: where it looked and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


@dataclass
class DatasetSplits:
    """Train / validation / test datasets; items are ``(x: float32 CxHxW tensor, y: int)``."""

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int


class TensorImages(Dataset):
    """Images held in memory as one ``N x C x H x W`` tensor, with an optional per-item transform.

    ``transform`` maps one stored image (any dtype) to a float32 ``C x H x W`` tensor; without it
    the stored images must already be float32.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} and labels {len(labels)} do not match")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])
