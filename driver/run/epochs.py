"""Where training stands, and one epoch's pass over the training data from there."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from driver.config import Config
from driver.data.load import make_loader
from driver.run.run_log import Tally


@dataclass
class Position:
    """Where training stands: the next batch to train is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


class Epoch:
    """The batches of epoch `pos.epoch` in its seeded order, from batch `pos.batch` on (a resumed
    epoch skips what was done), and the train accuracy of what it trained."""

    def __init__(self, cfg: Config, train_set: Any, pos: Position, rng: torch.Tensor | None):
        tc = cfg.train
        loader = make_loader(
            train_set,
            tc.batch_size,
            shuffle=True,
            seed=tc.seed,
            epoch=pos.epoch,
            num_workers=cfg.data.num_workers,
        )
        self.batches: Iterator = iter(loader)
        for _ in range(pos.batch):
            next(self.batches)
        if rng is not None:  # after skipping, so augmentation continues exactly
            torch.set_rng_state(rng)
        self.size = len(loader)  # batches in the whole epoch
        self.start = pos.batch  # the batch it began at
        self.tally = Tally()

    def next(self) -> Any:
        """The next (x, y) batch, or None at the epoch's end."""
        return next(self.batches, None)
