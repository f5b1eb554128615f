"""The training loop: epochs over a runner, per-epoch validation, test, JSON curves and stats."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from driver.config import Config, config_to_dict
from driver.data import DatasetSplits, load_dataset, make_loader
from driver.runners import Completed, Runner, base_spec, build_runner
from driver.stats import StatsBook

__all__ = ["RunLog", "base_spec", "evaluate", "train"]

log = logging.getLogger(__name__)


@dataclass
class RunLog:
    """The curves of one run, written as JSON after every epoch."""

    rule: str
    config: dict[str, Any]
    partition: list[int] = field(default_factory=list)
    predicted_stage_seconds: list[float] = field(default_factory=list)  # per micro-batch
    epochs: list[dict[str, float]] = field(default_factory=list)
    test_acc: float | None = None
    test_loss: float | None = None
    step_seconds: float = 0.0
    samples_per_second: float = 0.0
    steps: int = 0
    wall_seconds: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, path)


@torch.no_grad()
def evaluate(runner: Runner, ds: Any, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the runner's eval-mode forward over `ds`."""
    correct, loss, n = 0, 0.0, 0
    for x, y in make_loader(ds, max(batch_size, 256), shuffle=False, seed=0):
        logits = runner.infer(x).float().cpu()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return correct / max(n, 1), loss / max(n, 1)


class _Tally:
    """Train accuracy and loss from the logits of finished micro-batches."""

    def __init__(self) -> None:
        self.correct = self.seen = 0
        self.loss = 0.0

    def add(self, done: Completed) -> None:
        for logits, y in done:
            logits = logits.float().cpu()
            self.correct += int((logits.argmax(1) == y).sum())
            self.loss += float(F.cross_entropy(logits, y, reduction="sum"))
            self.seen += len(y)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.seen, 1)


def train(
    cfg: Config,
    *,
    quiet: bool = False,
    out_dir: Path | None = None,
    splits: DatasetSplits | None = None,
    track_test: bool = False,
) -> RunLog:
    """Train `cfg.rule` on `cfg.model` and `cfg.data`; return (and write) its curves.

    `track_test` also records test accuracy after every epoch (benchmarks measure convergence
    with it; model selection only ever looks at validation)."""
    t_start = time.perf_counter()
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # augmentation draws from the global generator
    splits = splits or load_dataset(cfg.data)
    runner, part = build_runner(cfg, splits)
    out = Path(out_dir or tc.out_dir) / cfg.rule.name
    run = RunLog(
        rule=cfg.rule.name,
        config=config_to_dict(cfg),
        partition=list(part.bounds),
        predicted_stage_seconds=list(part.stage_costs),
    )
    book = StatsBook()
    try:
        _epochs(
            cfg, runner, splits, run, book, out, quiet=quiet, track_test=track_test, t_start=t_start
        )
        run.test_acc, run.test_loss = evaluate(runner, splits.test, tc.batch_size)
    finally:
        runner.close()
    run.wall_seconds = time.perf_counter() - t_start
    run.write(out / "metrics.json")
    log.info("%s: test acc %.4f", cfg.rule.name, run.test_acc)
    return run


def _epochs(
    cfg: Config,
    runner: Runner,
    splits: DatasetSplits,
    run: RunLog,
    book: StatsBook,
    out: Path,
    *,
    quiet: bool,
    track_test: bool,
    t_start: float,
) -> None:
    tc = cfg.train
    train_time, samples = 0.0, 0
    for epoch in range(tc.epochs):
        loader = make_loader(
            splits.train,
            tc.batch_size,
            shuffle=True,
            seed=tc.seed,
            epoch=epoch,
            num_workers=cfg.data.num_workers,
        )
        tally = _Tally()
        bar = tqdm(
            loader,
            desc=f"{cfg.rule.name} epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=quiet,
            unit="step",
        )
        t_epoch = time.perf_counter()
        for x, y in bar:
            tally.add(runner.step(x, y, cfg.pipeline.micro_batches))
            book.add(runner.drain_stats())
            run.steps += 1
            samples += len(y)
            if run.steps % tc.log_every == 0:
                log.info(
                    "%s step %d: train acc %.3f loss %.3f",
                    cfg.rule.name,
                    run.steps,
                    tally.acc,
                    tally.mean_loss,
                )
            bar.set_postfix(acc=f"{tally.acc:.3f}", loss=f"{tally.mean_loss:.3f}")
            if tc.max_steps and run.steps >= tc.max_steps:
                break
        tally.add(runner.flush())
        book.add(runner.drain_stats(wait=True))
        train_time += time.perf_counter() - t_epoch
        val_acc, val_loss = evaluate(runner, splits.val, tc.batch_size)
        run.epochs.append(
            {
                "epoch": epoch + 1,
                "train_acc": tally.acc,
                "train_loss": tally.mean_loss,
                "val_acc": val_acc,
                "val_loss": val_loss,
                "seconds": time.perf_counter() - t_start,
                "train_seconds": train_time,
            }
        )
        if track_test:
            run.epochs[-1]["test_acc"] = evaluate(runner, splits.test, tc.batch_size)[0]
        log.info("%s epoch %d: val acc %.4f loss %.4f", cfg.rule.name, epoch + 1, val_acc, val_loss)
        run.step_seconds = train_time / max(run.steps, 1)
        run.samples_per_second = samples / max(train_time, 1e-9)
        run.stages = book.summary()
        run.write(out / "metrics.json")
        if tc.max_steps and run.steps >= tc.max_steps:
            break
