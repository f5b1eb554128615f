"""Datasets (digits, CIFAR-10, (Fashion-)MNIST, ImageNet folder, synthetic) and batch loaders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from driver.config.data import DataConfig
from driver.data.common import DataError, DatasetSplits, TensorImages

log = logging.getLogger(__name__)

DIGITS_HELD = 300  # digits: images in each of val and test (train keeps the other 1,197)
SYNTHETIC_CLASSES = 10
SYNTHETIC_SNR = 1.0  # class-mean amplitude per coarse cell vs unit noise: linear ~75-90% test


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


def check_present(cfg: DataConfig) -> None:
    """DataError unless the dataset's files are where data.root says, found without reading
    them: what load_dataset would refuse first (the service's admission asks this)."""
    if cfg.name in ("digits", "synthetic") or cfg.download:
        return
    if cfg.name == "cifar10":
        from torchvision.datasets import CIFAR10

        from driver.data.cifar import cifar_missing

        problem = cifar_missing(Path(cfg.root) / CIFAR10.base_folder)
        if problem:
            raise DataError(problem)
    elif cfg.name in ("fashion_mnist", "mnist"):
        from driver.data.mnist import locate

        locate(cfg.name, cfg.root)
    else:
        from driver.data.imagenet import check_split

        for split in ("train", "val"):
            check_split(Path(cfg.root) / split)


def batch_count(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    """The batches a pass over `n` samples makes."""
    return n // batch_size if drop_last else -(-n // batch_size)


def _generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def seeded_order(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s order of `n` samples: the permutation a DataLoader(shuffle=True) with this
    (seed, epoch) generator gave (it draws its worker base seed first, then the permutation),
    so runs keep the order they had before the loader could start mid-epoch."""
    generator = _generator(seed, epoch)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the worker base seed
    return torch.randperm(n, generator=generator).tolist()


class SeededBatch(list):
    """One batch's sample indices, and the seed its random transforms draw from."""

    def __init__(self, indices: list[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


class SeededBatches(Sampler[SeededBatch]):
    """The batches of one pass in its seeded order, from batch `start` on: a resumed epoch
    begins at its position without reading a sample before it. Batch b's augmentation seed
    depends only on (seed, epoch, b), wherever and in whichever process it is decoded."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        drop_last: bool = False,
        start: int = 0,
    ) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.epoch, self.drop_last = seed, epoch, drop_last
        self.total = batch_count(n, batch_size, drop_last=drop_last)
        if not 0 <= start <= self.total:
            raise ValueError(f"start batch {start} is outside the epoch's {self.total} batches")
        self.start = start

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[SeededBatch]:
        order = seeded_order(self.n, self.seed, self.epoch) if self.shuffle else range(self.n)
        bs = self.batch_size
        for b in range(self.start, self.total):
            state = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(2)
            seed = int(state[0]) << 32 | int(state[1])
            yield SeededBatch(list(order[b * bs : (b + 1) * bs]), seed)


class BatchSeeded(Dataset):
    """`ds`, read a batch at a time with torch's RNG seeded by the batch's own seed (and put
    back after, so a caller's draws go on as if the batch had not been read)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.ds[index]

    def __getitems__(self, batch: SeededBatch) -> list[Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch.seed)
            return [self.ds[i] for i in batch]


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    start: int = 0,
) -> DataLoader:
    """A DataLoader whose order, augmentation and worker seeds depend only on ``(seed, epoch)``,
    from batch ``start`` of the pass on (the batches before it are never read)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = SeededBatches(
        len(ds),  # type: ignore[arg-type]
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        drop_last=drop_last,
        start=start,
    )
    return DataLoader(
        BatchSeeded(ds),
        batch_sampler=batches,
        generator=_generator(seed, epoch),  # the workers' base seed, as before
        num_workers=num_workers,
        persistent_workers=False,
    )


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
