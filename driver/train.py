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

from driver import checkpoint
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


@dataclass
class Position:
    """Where training stands: the next batch to train is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


def train(
    cfg: Config,
    *,
    quiet: bool = False,
    out_dir: Path | None = None,
    splits: DatasetSplits | None = None,
    track_test: bool = False,
    resume: str | Path | None = None,
) -> RunLog:
    """Train `cfg.rule` on `cfg.model` and `cfg.data`; return (and write) its curves.

    `track_test` also records test accuracy after every epoch (benchmarks measure convergence
    with it; model selection only ever looks at validation). `resume` continues from a
    checkpoint file (or a run's checkpoint directory) at its exact step and data position."""
    t_start = time.perf_counter()
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # augmentation draws from the global generator
    config = config_to_dict(cfg)
    state = None
    if resume is not None:
        state = checkpoint.load(resume)
        checkpoint.check_compatible(state, config, resume)
    splits = splits or load_dataset(cfg.data)
    runner, part = build_runner(cfg, splits)
    out = Path(out_dir or tc.out_dir) / cfg.rule.name
    run = RunLog(
        rule=cfg.rule.name,
        config=config,
        partition=list(part.bounds),
        predicted_stage_seconds=list(part.stage_costs),
    )
    pos = Position()
    try:
        if state is not None:
            runner.load_state_dict(state["runner"])
            pos = Position(**state["position"])
            run.epochs, run.steps = list(state["runlog"]["epochs"]), state["runlog"]["steps"]
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                resume,
                run.steps,
                pos.epoch + 1,
                pos.batch,
            )
        _epochs(
            cfg,
            runner,
            splits,
            run,
            StatsBook(),
            out,
            pos,
            quiet=quiet,
            track_test=track_test,
            t_start=t_start,
            rng=None if state is None else state["torch_rng"],
        )
        run.test_acc, run.test_loss = evaluate(runner, splits.test, tc.batch_size)
        _checkpoint(runner, out, run, pos, config, tc.keep_checkpoints)
    finally:
        runner.close()
    run.wall_seconds = time.perf_counter() - t_start
    run.write(out / "metrics.json")
    log.info("%s: test acc %.4f", cfg.rule.name, run.test_acc)
    return run


def _checkpoint(
    runner: Runner, out: Path, run: RunLog, pos: Position, config: dict[str, Any], keep: int
) -> Path:
    state = {
        "config": config,
        "runner": runner.state_dict(),
        "position": {"epoch": pos.epoch, "batch": pos.batch},
        "runlog": {"epochs": run.epochs, "steps": run.steps},
        "torch_rng": torch.get_rng_state(),
    }
    return checkpoint.save(out / "checkpoints", run.steps, state, keep=keep)


def _epochs(
    cfg: Config,
    runner: Runner,
    splits: DatasetSplits,
    run: RunLog,
    book: StatsBook,
    out: Path,
    pos: Position,
    *,
    quiet: bool,
    track_test: bool,
    t_start: float,
    rng: torch.Tensor | None,
) -> None:
    tc = cfg.train
    train_time, samples = 0.0, 0
    while pos.epoch < tc.epochs:
        epoch = pos.epoch
        loader = make_loader(
            splits.train,
            tc.batch_size,
            shuffle=True,
            seed=tc.seed,
            epoch=epoch,
            num_workers=cfg.data.num_workers,
        )
        batches = iter(loader)
        for _ in range(pos.batch):  # a resumed epoch: the same order, minus what was trained
            next(batches)
        if rng is not None:  # restore after skipping: augmentation draws continue exactly
            torch.set_rng_state(rng)
            rng = None
        tally = _Tally()
        bar = tqdm(
            batches,
            desc=f"{cfg.rule.name} epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=quiet,
            unit="step",
            initial=pos.batch,
            total=len(loader),
        )
        t_epoch = time.perf_counter()
        stop = False
        for x, y in bar:
            tally.add(runner.step(x, y, cfg.pipeline.micro_batches))
            book.add(runner.drain_stats())
            run.steps += 1
            pos.batch += 1
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
            if tc.checkpoint_every and run.steps % tc.checkpoint_every == 0:
                tally.add(runner.flush())
                _checkpoint(runner, out, run, pos, run.config, tc.keep_checkpoints)
            if tc.max_steps and run.steps >= tc.max_steps:
                stop = True
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
        if stop:  # max_steps: the position stays mid-epoch, where a resume continues
            break
        pos.epoch, pos.batch = epoch + 1, 0
