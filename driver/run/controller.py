"""The run's lifecycle as an explicit state machine, stepped one transition at a time.

    pending -> starting -> running <-> checkpointing -> succeeded | stopped
                              |  \\-> recovering -> running          (a stage died or hung)
                              \\----> failed                          (anything else)

`running` does one unit of work per step (a batch, an epoch's validation, the final test), so
tests and the service can drive, observe and stop a run between any two transitions.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cluster.errors import PlacementError, StageDied, StageError, StageTimeout
from driver.api.metrics import Metrics
from driver.config import Config, config_to_dict
from driver.data.common import DatasetSplits
from driver.data.load import load_dataset, make_loader
from driver.pipeline.build import Runner, build_runner
from driver.run import checkpoint
from driver.run.run_log import RunLog, Tally, evaluate
from driver.run.stats import StatsBook
from workers.spec import NonFiniteError

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED})
RECOVERABLE = (StageDied, StageTimeout, PlacementError)


@dataclass
class Position:
    """Where training stands: the next batch to train is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


class Controller:
    """Drives one training run: data, runner, epochs, evaluation, checkpoints, recovery."""

    def __init__(
        self,
        cfg: Config,
        *,
        quiet: bool = True,
        out_dir: Path | None = None,
        splits: DatasetSplits | None = None,
        resume: str | Path | None = None,
        track_test: bool = False,
        on_transition: Callable[[Controller], None] | None = None,
        metrics: Metrics | None = None,
        run_id: str | None = None,
    ) -> None:
        self.cfg, self.quiet, self.track_test = cfg, quiet, track_test
        self.metrics = metrics
        self.run_id = run_id or cfg.rule.name
        if metrics:
            metrics.register_run(self.run_id)
        self.state = RunState.PENDING
        self.splits = splits
        self.resume = resume
        self.on_transition = on_transition
        self.config = config_to_dict(cfg)
        self.out = Path(out_dir or cfg.train.out_dir) / cfg.rule.name
        self.run = RunLog(rule=cfg.rule.name, config=self.config)
        self.book = StatsBook()
        self.pos = Position()
        self.runner: Runner | None = None
        self.restarts = 0
        self.checkpoints_written = 0
        self.error: str | None = None
        self._bounds: tuple[int, ...] | None = None
        self._batches: Iterator | None = None
        self._tally = Tally()
        self._bar = tqdm(disable=True)
        self._rng: torch.Tensor | None = None
        self._after_checkpoint = RunState.RUNNING
        self._stop = False
        self._t_start = time.perf_counter()
        self._train_time = 0.0
        self._samples = 0
        self._per_epoch = 1  # batches in an epoch, set when one opens

    # -- driving ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def request_stop(self) -> None:
        """Graceful stop: the run checkpoints at the next transition, then stops."""
        self._stop = True

    def run_to_end(self) -> RunLog:
        try:
            while not self.done:
                self.step()
        finally:
            self._close()
        if self.state is RunState.FAILED:
            raise RunFailed(self.error or "the run failed")
        return self.run

    def step(self) -> RunState:
        """One transition."""
        handlers = {
            RunState.PENDING: self._pending,
            RunState.STARTING: self._starting,
            RunState.RUNNING: self._running,
            RunState.CHECKPOINTING: self._checkpointing,
            RunState.RECOVERING: self._recovering,
        }
        if self.done:
            return self.state
        try:
            new = handlers[self.state]()
        except RECOVERABLE as exc:
            new = self._on_lost_stage(exc)
        except (StageError, NonFiniteError) as exc:
            new = self._fail(str(exc))
        if new in TERMINAL:
            self._close()
        self.state = new
        if self.metrics:
            self.metrics.set_state(self.run_id, new.value)
        if self.on_transition:
            self.on_transition(self)
        return new

    # -- transitions --------------------------------------------------------------------------
    def _pending(self) -> RunState:
        if self.resume is not None:
            state = checkpoint.load(self.resume)
            checkpoint.check_compatible(state, self.config, self.resume)
            self._restore(state)
        self.splits = self.splits or load_dataset(self.cfg.data)
        return RunState.STARTING

    def _starting(self) -> RunState:
        assert self.splits is not None
        self.runner, part = build_runner(self.cfg, self.splits, self._bounds)
        self._bounds = part.bounds
        self.run.partition = list(part.bounds)
        self.run.predicted_stage_seconds = list(part.stage_costs)
        if self._resume_state is not None:
            self.runner.load_state_dict(self._resume_state["runner"])
            self._resume_state = None
        elif self.cfg.train.max_restarts and not checkpoint.checkpoints(self.ckpt_dir):
            self._save()  # recovery needs something to go back to, from the first step on
        return RunState.RUNNING

    _resume_state: dict[str, Any] | None = None

    def _restore(self, state: dict[str, Any]) -> None:
        self._resume_state = state
        self.pos = Position(**state["position"])
        self.run.epochs = list(state["runlog"]["epochs"])
        self.run.steps = state["runlog"]["steps"]
        self._rng = state["torch_rng"]
        self._batches = None
        log.info(
            "%s: continuing at step %d (epoch %d, batch %d)",
            self.cfg.rule.name,
            self.run.steps,
            self.pos.epoch + 1,
            self.pos.batch,
        )

    def _running(self) -> RunState:
        tc, runner = self.cfg.train, self.runner
        assert runner is not None and self.splits is not None
        if self._stop:
            self._after_checkpoint = RunState.STOPPED
            return RunState.CHECKPOINTING
        if self.pos.epoch >= tc.epochs or (
            tc.max_steps and self.run.steps >= tc.max_steps and self._batches is None
        ):
            self.run.test_acc, self.run.test_loss = evaluate(
                runner, self.splits.test, tc.batch_size
            )
            if self.metrics:
                self.metrics.test_acc.labels(self.run_id).set(self.run.test_acc)
            self._after_checkpoint = RunState.SUCCEEDED
            return RunState.CHECKPOINTING
        if self._batches is None:
            self._open_epoch()
        assert self._batches is not None
        batch = next(self._batches, None)
        if batch is None or (tc.max_steps and self.run.steps >= tc.max_steps):
            self._close_epoch(finished=batch is None)
            return RunState.RUNNING
        t0 = time.perf_counter()
        x, y = batch
        self._tally.add(runner.step(x, y, self.cfg.pipeline.micro_batches))
        self.run.steps += 1
        self.pos.batch += 1
        self._record(runner.drain_stats())
        dt = time.perf_counter() - t0
        self._train_time += dt
        if self.metrics:
            self.metrics.step(self.run_id, dt, len(y))
        self._samples += len(y)
        self._bar.update(1)
        self._bar.set_postfix(acc=f"{self._tally.acc:.3f}", loss=f"{self._tally.mean_loss:.3f}")
        if self.run.steps % tc.log_every == 0:
            log.info(
                "%s step %d: train acc %.3f loss %.3f",
                self.cfg.rule.name,
                self.run.steps,
                self._tally.acc,
                self._tally.mean_loss,
            )
        if tc.eval_every_steps and self.run.steps % tc.eval_every_steps == 0:
            acc, loss = evaluate(runner, self.splits.val, tc.batch_size)
            self.run.evals.append({"step": self.run.steps, "val_acc": acc, "val_loss": loss})
        if tc.checkpoint_every and self.run.steps % tc.checkpoint_every == 0:
            self._after_checkpoint = RunState.RUNNING
            return RunState.CHECKPOINTING
        return RunState.RUNNING

    def _open_epoch(self) -> None:
        tc = self.cfg.train
        assert self.splits is not None
        loader = make_loader(
            self.splits.train,
            tc.batch_size,
            shuffle=True,
            seed=tc.seed,
            epoch=self.pos.epoch,
            num_workers=self.cfg.data.num_workers,
        )
        batches = iter(loader)
        for _ in range(self.pos.batch):  # a resumed epoch: the same order, minus what was done
            next(batches)
        if self._rng is not None:  # after skipping, so augmentation continues exactly
            torch.set_rng_state(self._rng)
            self._rng = None
        self._batches = batches
        self._per_epoch = len(loader)
        self._tally = Tally()
        self._bar = tqdm(
            total=len(loader),
            initial=self.pos.batch,
            leave=False,
            unit="step",
            desc=f"{self.cfg.rule.name} epoch {self.pos.epoch + 1}/{tc.epochs}",
            disable=self.quiet,
        )

    def _close_epoch(self, *, finished: bool) -> None:
        tc, runner = self.cfg.train, self.runner
        assert runner is not None and self.splits is not None
        self._bar.close()
        t0 = time.perf_counter()
        self._tally.add(runner.flush())
        self._record(runner.drain_stats(wait=True), epoch_end=True)
        self._train_time += time.perf_counter() - t0
        val_acc, val_loss = evaluate(runner, self.splits.val, tc.batch_size)
        if self.metrics:
            self.metrics.val_acc.labels(self.run_id).set(val_acc)
        entry = {
            "epoch": self.pos.epoch + 1,
            "train_acc": self._tally.acc,
            "train_loss": self._tally.mean_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - self._t_start,
            "train_seconds": self._train_time,
        }
        if self.track_test:
            entry["test_acc"] = evaluate(runner, self.splits.test, tc.batch_size)[0]
        self.run.epochs.append(entry)
        log.info(
            "%s epoch %d: val acc %.4f loss %.4f",
            self.cfg.rule.name,
            self.pos.epoch + 1,
            val_acc,
            val_loss,
        )
        self.run.step_seconds = self._train_time / max(self.run.steps, 1)
        self.run.samples_per_second = self._samples / max(self._train_time, 1e-9)
        self.run.stages = self.book.summary()
        self.run.restarts = self.restarts
        self.run.write(self.out / "metrics.json")
        self._batches = None
        if finished:  # max_steps keeps the position mid-epoch, where a resume continues
            self.pos = Position(self.pos.epoch + 1, 0)

    def _checkpointing(self) -> RunState:
        assert self.runner is not None
        self._tally.add(self.runner.flush())
        self._save()
        if self._after_checkpoint is not RunState.RUNNING:
            self.run.wall_seconds = time.perf_counter() - self._t_start
            self.run.restarts = self.restarts
            self.run.write(self.out / "metrics.json")
        return self._after_checkpoint

    def _recovering(self) -> RunState:
        self._close()
        state = checkpoint.load(self.ckpt_dir)
        self._restore(state)
        self.restarts += 1
        self.run.restarts = self.restarts
        if self.metrics:
            self.metrics.restarts.labels(self.run_id).inc()
        return RunState.STARTING

    # -- helpers ------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _save(self) -> Path:
        assert self.runner is not None
        state = {
            "config": self.config,
            "runner": self.runner.state_dict(),
            "position": {"epoch": self.pos.epoch, "batch": self.pos.batch},
            "runlog": {"epochs": self.run.epochs, "steps": self.run.steps},
            "torch_rng": torch.get_rng_state(),
        }
        path = checkpoint.save(
            self.ckpt_dir, self.run.steps, state, keep=self.cfg.train.keep_checkpoints
        )
        self.checkpoints_written += 1
        if self.metrics:
            self.metrics.checkpoint(self.run_id)
        return path

    def _record(self, reports: list, *, epoch_end: bool = False) -> None:
        self.book.add(reports)
        if self.metrics:
            self.metrics.stages(self.run_id, reports)
        if epoch_end or self.run.steps % self.cfg.train.log_every == 0:
            epoch = self.pos.epoch + self.pos.batch / max(self._per_epoch, 1)
            self.run.note_alignment(self.book, self.run.steps, epoch)

    def _on_lost_stage(self, exc: Exception) -> RunState:
        self.error = str(exc)
        if self.restarts >= self.cfg.train.max_restarts or not checkpoint.checkpoints(
            self.ckpt_dir
        ):
            return self._fail(
                f"{exc}; no restarts left (train.max_restarts = {self.cfg.train.max_restarts})"
            )
        log.warning("%s; recreating the stages from the last checkpoint", exc)
        self._close()
        return RunState.RECOVERING

    def _fail(self, message: str) -> RunState:
        self.error = message
        log.error("run failed: %s", message)
        self.run.error = message
        self.run.write(self.out / "metrics.json")
        return RunState.FAILED

    def _close(self) -> None:
        if self.runner is not None:
            try:
                self.runner.close()
            finally:
                self.runner = None


class RunFailed(RuntimeError):
    """The run ended in the failed state; the message says why (stage, layer, step)."""
