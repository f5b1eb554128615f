"""A mid-epoch resume starts the seeded order at its batch: nothing before it is read, and the
batches after it are those an uninterrupted run trains, augmentation draws included."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from ckpt_helpers import TINY
from torch.utils.data import Dataset
from torchvision.transforms import v2

from driver.config import load_config
from driver.data.common import DatasetSplits, TensorImages
from driver.data.load import make_loader
from driver.run.train import train

BATCH = 64  # TINY's train.batch_size
RESUME_AT = 7  # the checkpoint's step: batch 7 of epoch 0


class CountingDataset(Dataset):
    """`base`, recording the index of every item read, in the order read."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        self.reads.append(int(index))
        return self.base[index]


def _counted(digits: DatasetSplits) -> tuple[DatasetSplits, CountingDataset]:
    counting = CountingDataset(digits.train)
    return replace(digits, train=counting), counting


def test_resume_reads_only_the_remaining_samples_in_the_uninterrupted_order(digits, tmp_path):
    cfg = load_config(None, [*TINY, "train.epochs=2", "train.checkpoint_every=7"])
    n = len(digits.train)
    full_splits, full = _counted(digits)
    train(cfg, quiet=True, out_dir=tmp_path / "full", splits=full_splits)
    assert len(full.reads) == 2 * n  # the train split is read by the two epochs and nothing else

    resumed_splits, resumed = _counted(digits)
    ckpt = tmp_path / "full" / "rec_lra" / "checkpoints" / f"ckpt-{RESUME_AT:08d}.pt"
    run = train(cfg, quiet=True, out_dir=tmp_path / "resumed", splits=resumed_splits, resume=ckpt)
    assert run.steps == 2 * -(-n // BATCH)
    skipped = RESUME_AT * BATCH
    assert len(resumed.reads) == 2 * n - skipped  # not one sample before the position
    assert resumed.reads == full.reads[skipped:]  # the same samples, in the same order


def _augmented(n: int = 40) -> TensorImages:
    images = torch.arange(n * 3 * 8 * 8, dtype=torch.float32).view(n, 3, 8, 8)
    crop_flip = v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip()])
    return TensorImages(images, torch.arange(n), crop_flip)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_started_mid_pass_gives_the_rest_of_the_pass_bit_for_bit(workers):
    """Each batch's augmentation is seeded by its own number: a pass started at batch 3 (in
    worker processes too) gives exactly batches 3.. of the whole pass."""
    ds = _augmented()
    whole = list(make_loader(ds, 6, shuffle=True, seed=3, epoch=1))
    torch.manual_seed(123)  # the caller's RNG state plays no part in the batches
    rest = list(make_loader(ds, 6, shuffle=True, seed=3, epoch=1, start=3, num_workers=workers))
    assert len(whole) == 7 and len(rest) == 4
    for (x, y), (rx, ry) in zip(whole[3:], rest, strict=True):
        assert torch.equal(ry, y) and torch.equal(rx, x)
    assert not torch.equal(whole[0][0], ds.images[whole[0][1]])  # the transform did draw


def test_reading_a_batch_leaves_the_callers_rng_where_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    list(make_loader(_augmented(), 6, shuffle=True, seed=0))
    assert torch.equal(torch.rand(3), expected)


def test_start_at_the_end_gives_nothing_and_past_it_is_refused():
    ds = _augmented(12)
    assert list(make_loader(ds, 6, shuffle=True, seed=0, start=2)) == []
    with pytest.raises(ValueError, match="start batch 3 is outside the epoch's 2 batches"):
        make_loader(ds, 6, shuffle=True, seed=0, start=3)
