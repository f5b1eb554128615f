"""Where training stands, and one epoch's pass over the training data from there."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from driver.config import Config
from driver.data.decode import RayDecoded
from driver.data.load import batch_count, make_loader
from driver.run.run_log import Tally


@dataclass
class Position:
    """Where training stands: the next batch to train is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


class Epoch:
    """The batches of epoch `pos.epoch` in its seeded order, from batch `pos.batch` on (a resumed
    epoch starts there: no batch before it is read or decoded), and the train accuracy of what
    it trained. `data.decode` says where the batches are decoded."""

    def __init__(self, cfg: Config, train_set: Any, pos: Position, rng: torch.Tensor | None):
        tc, dc = cfg.train, cfg.data
        order: dict[str, Any] = {  # the epoch's seeded order, from the batch it begins at
            "shuffle": True,
            "seed": tc.seed,
            "epoch": pos.epoch,
            "start": pos.batch,
            "num_workers": dc.num_workers,
        }
        if dc.decode == "ray":
            self.batches: Iterator = iter(
                RayDecoded(
                    train_set,
                    tc.batch_size,
                    cpus=dc.decode_cpus,
                    timeout_s=dc.decode_timeout_s,
                    **order,
                )
            )
        else:
            self.batches = iter(make_loader(train_set, tc.batch_size, **order))
        if rng is not None:  # the run's own draws (input noise...) go on exactly; batches draw
            torch.set_rng_state(rng)  # from seeds of their own (driver/data/load.py)
        self.size = batch_count(len(train_set), tc.batch_size)  # batches in the whole epoch
        self.start = pos.batch  # the batch it began at
        self.tally = Tally()

    def next(self) -> Any:
        """The next (x, y) batch, or None at the epoch's end."""
        return next(self.batches, None)
