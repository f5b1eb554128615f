"""Train batches decoded off the driver: a Ray actor runs the run's loader and hands over batches.

The actor holds the same loader a driver would (driver/data/load.py make_loader: the seeded
order from the resume position, each batch's augmentation seeded by its own number, the
DataLoader workers), so its batches equal the driver's bit for bit. Its calls run in order, so
the driver keeps a few calls queued and the actor decodes the next batches while the stages
train on this one. The batch comes back to the driver, which cuts it into micro-batches as
before: the engines take a step's batch as tensors at the driver.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import ray
import torch
from torch.utils.data import Dataset

from driver.data.load import make_loader

PREFETCH = 4  # batch calls queued on the decoder: it decodes ahead while the stages train


class Decoder:
    """One epoch's loader in an actor's process: `next()` returns the next (x, y) batch, or
    None after the last."""

    def __init__(self, ds: Dataset, batch_size: int, threads: int, **loader: Any) -> None:
        torch.set_num_threads(threads)
        self.batches = iter(make_loader(ds, batch_size, **loader))

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return next(self.batches, None)


class RayDecoded:
    """The batches of one pass (make_loader's arguments), decoded by a Decoder actor that
    reserves `cpus` CPUs; each wait for a batch is bounded by `timeout_s`. The actor ends when
    the pass is done or this object is dropped."""

    def __init__(
        self,
        ds: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        start: int = 0,
        num_workers: int = 0,
        cpus: float = 1.0,
        timeout_s: float = 300.0,
    ) -> None:
        if not ray.is_initialized():
            raise ValueError(
                'data.decode: "ray" decodes in a Ray actor, but this run has no Ray '
                '(pipeline.stages = 1 or pipeline.backend = "local"); set data.decode = "driver" '
                "or run the stages on Ray"
            )
        self.cpus, self.timeout_s = cpus, timeout_s
        actor = ray.remote(Decoder).options(num_cpus=cpus)  # type: ignore[attr-defined]
        self.actor: Any = actor.remote(
            ds,
            batch_size,
            max(1, int(cpus)),
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            start=start,
            num_workers=num_workers,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        queued: deque = deque(self.actor.next.remote() for _ in range(PREFETCH))
        try:
            while True:
                ready, _ = ray.wait([queued[0]], timeout=self.timeout_s)
                if not ready:
                    raise TimeoutError(
                        f"data.decode: no decoded batch within data.decode_timeout_s = "
                        f"{self.timeout_s:g} s; the decoder asks data.decode_cpus = {self.cpus:g} "
                        "free CPUs on a node that reads data.root (see `ray status`): free them, "
                        "lower decode_cpus, or raise the timeout"
                    )
                batch = ray.get(queued.popleft())
                if batch is None:
                    return
                queued.append(self.actor.next.remote())
                yield batch
        finally:
            if ray.is_initialized():  # a run that lost its Ray has lost the actor with it
                ray.kill(self.actor)
