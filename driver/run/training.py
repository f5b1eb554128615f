"""The work of the running state, one unit per call: a batch, an epoch's end (flush, stats,
validation), an evaluation. The Controller inherits it and decides what comes next."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from driver.config import Config
from driver.data.common import DatasetSplits
from driver.pipeline.build import Runner
from driver.run.callbacks import Callback, RunState
from driver.run.epochs import Epoch, Position
from driver.run.run_log import RunLog, evaluate
from driver.run.stats import StatsBook


class TrainingWork:
    """What the Controller trains with (set in its __init__), and the units of work on it."""

    cfg: Config
    run_id: str
    state: RunState
    splits: DatasetSplits | None
    runner: Runner | None
    pos: Position
    run: RunLog
    book: StatsBook
    epoch: Epoch | None
    callbacks: Sequence[Callback]
    track_test: bool
    restarts: int
    error: str | None
    train_seconds: float
    samples: int
    _rng: torch.Tensor | None
    _t_start: float

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t_start

    def _open_epoch(self) -> Epoch:
        assert self.splits is not None
        self.epoch = Epoch(self.cfg, self.splits.train, self.pos, self._rng)
        self._rng = None
        for cb in self.callbacks:
            cb.after_epoch_start(self)
        return self.epoch

    def _train_batch(self, epoch: Epoch, batch: Any) -> None:
        assert self.runner is not None
        t0 = time.perf_counter()
        x, y = batch
        epoch.tally.add(self.runner.step(x, y, self.cfg.pipeline.micro_batches))
        self.run.steps += 1
        self.pos.batch += 1
        self._record(self.runner.drain_stats())
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self.samples += len(y)
        for cb in self.callbacks:
            cb.after_train_step(self, dt, len(y))
        every = self.cfg.train.eval_every_steps
        if every and self.run.steps % every == 0:
            acc, loss = self._evaluate("val", periodic=True)
            self.run.evals.append({"step": self.run.steps, "val_acc": acc, "val_loss": loss})

    def _close_epoch(self, epoch: Epoch, *, finished: bool) -> None:
        assert self.runner is not None
        t0 = time.perf_counter()
        epoch.tally.add(self.runner.flush())
        self._record(self.runner.drain_stats(wait=True), epoch_end=True)
        self.train_seconds += time.perf_counter() - t0
        val_acc, val_loss = self._evaluate("val")
        entry = {
            "epoch": self.pos.epoch + 1,
            "train_acc": epoch.tally.acc,
            "train_loss": epoch.tally.mean_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "seconds": self.elapsed,
            "train_seconds": self.train_seconds,
        }
        if self.track_test:
            entry["test_acc"] = self._evaluate("test", periodic=True)[0]
        self.run.epochs.append(entry)
        for cb in self.callbacks:
            cb.after_epoch(self, entry)
        self.epoch = None
        if finished:  # max_steps keeps the position mid-epoch, where a resume continues
            self.pos = Position(self.pos.epoch + 1, 0)

    def _evaluate(self, split: str, *, periodic: bool = False) -> tuple[float, float]:
        assert self.runner is not None and self.splits is not None
        ds = self.splits.val if split == "val" else self.splits.test
        acc, loss = evaluate(self.runner, ds, self.cfg.train.batch_size)
        for cb in self.callbacks:
            cb.after_evaluation(self, split, acc, loss, periodic=periodic)
        return acc, loss

    def _record(self, reports: list, *, epoch_end: bool = False) -> None:
        self.book.add(reports)
        for cb in self.callbacks:
            cb.after_stage_stats(self, reports)
        if epoch_end or self.run.steps % self.cfg.train.log_every == 0:
            size = self.epoch.size if self.epoch is not None else 1
            epoch = self.pos.epoch + self.pos.batch / max(size, 1)
            self.run.note_alignment(self.book, self.run.steps, epoch)
