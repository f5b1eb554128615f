"""The run's lifecycle as an explicit state machine, stepped one transition at a time.

    pending -> starting -> running <-> checkpointing -> succeeded | stopped
                              |  \\-> recovering -> running          (an actor died or hung)
                              \\----> failed                          (any other error)

`running` does one unit of work per step (a batch, an epoch's validation, the final test), so
tests and the service can drive, observe and stop a run between any two transitions. Every
error raised while stepping ends in `failed` through one path; what observes the run (metrics,
the run log, progress, the service's watchers) is a callback (driver/run/callbacks.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from driver.config import Config, config_to_dict, resolved_line
from driver.data.common import DatasetSplits
from driver.data.load import load_dataset
from driver.pipeline.build import Runner
from driver.pipeline.elastic import Elastic
from driver.pipeline.plan import PipelinePlan
from driver.run import checkpoint_store, storage
from driver.run.callbacks import TERMINAL, Callback, RunState
from driver.run.checkpointing import Checkpoints, run_part
from driver.run.epochs import Epoch, Position
from driver.run.errors import RECOVERABLE, FailurePolicy, RunFailed, failure_message
from driver.run.observers import RunLogWriter
from driver.run.progress import Progress
from driver.run.run_log import RunLog, evaluate, evaluate_exits
from driver.run.stats import StatsBook
from driver.run.trackers import tracker_callbacks
from workers.rules import rule_decoupled

__all__ = ["TERMINAL", "Controller", "Position", "RunFailed", "RunState"]

log = logging.getLogger(__name__)


class Controller:
    """Drives one training run: data, runner, epochs, evaluation, checkpoints, recovery.

    One class that only steps states; it composes its collaborators rather than inheriting
    them: the runner and its plan (driver/pipeline/build.py), the elastic stage count
    (driver/pipeline/elastic.py), the checkpoint writer (driver/run/checkpointing.py), the
    failure policy (driver/run/errors.py) and the callbacks that observe it.

    `callbacks` observe it (default: progress log lines; the service adds its Prometheus
    series, driver/api/metrics_callback.py); the run log (metrics.json) is always written, and
    the experiment trackers train.trackers names (driver/run/trackers/) log beside it. A
    `resume` checkpoint that cannot be used raises CheckpointError here, before the run
    exists."""

    def __init__(
        self,
        cfg: Config,
        *,
        out_dir: str | Path | None = None,
        splits: DatasetSplits | None = None,
        resume: str | Path | None = None,
        track_test: bool = False,
        callbacks: Sequence[Callback] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.cfg, self.track_test = cfg, track_test
        self.run_id = run_id or cfg.rule.label
        self.state = RunState.PENDING
        self.splits = splits
        self.config = config_to_dict(cfg)
        self.out = storage.join(out_dir or cfg.train.out_dir, cfg.rule.label)
        self.run = RunLog(rule=cfg.rule.label, config=self.config, config_origin=dict(cfg.origin))
        trackers = tracker_callbacks(cfg, self.out)  # a missing package stops the run here
        self.book = StatsBook()
        self.pos = Position()
        self.runner: Runner | None = None
        self.elastic = Elastic(cfg)  # the stage count trained on (pipeline.elastic)
        self.epoch: Epoch | None = None
        self.restarts = 0
        self.checkpoints = Checkpoints(keep=cfg.train.keep_checkpoints)  # written in the background
        self.failures = FailurePolicy(cfg.train.max_restarts)
        self.error: str | None = None
        self.train_seconds = 0.0
        self.samples = 0
        self._t_start = time.perf_counter()
        self._cause: BaseException | None = None
        self._bounds: tuple[int, ...] | None = None  # the cut to rebuild on (None: plan one)
        self.plan: PipelinePlan | None = None  # what the last build resolved (K, cut, window)
        self._rng: torch.Tensor | None = None
        self._resume_state: dict[str, Any] | None = None
        self._after_checkpoint = RunState.RUNNING
        self._stop = False
        self._threads: int | None = None  # torch's thread count before train.threads
        if resume is not None:
            state = checkpoint_store.load(resume)
            checkpoint_store.check_compatible(state, self.config, resume)
            self._restore(state)
        # the trackers come after the run log's writer: they read what it fills in at the end
        own: list[Callback] = [RunLogWriter(storage.join(self.out, "metrics.json")), *trackers]
        self.callbacks = [*own, *(callbacks if callbacks is not None else [Progress()])]

    # -- driving ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def ckpt_dir(self) -> storage.Location:
        return storage.join(self.out, "checkpoints")

    @property
    def checkpoints_written(self) -> int:
        return self.checkpoints.published

    def request_stop(self) -> None:
        """Graceful stop: the run checkpoints at the next transition, then stops."""
        self._stop = True

    def cancel(self) -> None:
        """End a run that was never stepped (a queued one): pending -> stopped, one path."""
        if self.state is not RunState.PENDING:
            raise RuntimeError(f"cancel: the run is {self.state.value}; use request_stop")
        self._enter(RunState.PENDING, RunState.STOPPED)

    def run_to_end(self) -> RunLog:
        """Step until the run ends; raise RunFailed (from the error) when it failed."""
        try:
            while not self.done:
                self.step()
        finally:
            self._close()  # also when interrupted between steps
        if self.state is RunState.FAILED:
            raise RunFailed(self.error or "the run failed") from self._cause
        return self.run

    def step(self) -> RunState:
        """One transition. Any error raised by the work (or a callback) fails the run here."""
        if self.done:
            return self.state
        previous = self.state
        try:
            try:
                new = self._work(previous)
            except RECOVERABLE as exc:
                new = self._lost_actors(exc)
        except Exception as exc:  # every other error, expected or not, fails the run
            new = self._fail(exc)
        self._enter(previous, new)
        return self.state

    def _enter(self, previous: RunState, new: RunState) -> None:
        if new in TERMINAL:
            self._close_quietly()
        self.state = new
        try:
            for cb in self.callbacks:
                cb.after_transition(self, previous, new)
        except Exception as exc:
            if new in TERMINAL:
                raise  # the run has ended; nothing is left to fail
            self._enter(new, self._fail(exc))

    def _work(self, state: RunState) -> RunState:
        return {
            RunState.PENDING: self._pending,
            RunState.STARTING: self._starting,
            RunState.RUNNING: self._running,
            RunState.CHECKPOINTING: self._checkpointing,
            RunState.RECOVERING: self._recovering,
        }[state]()

    # -- transitions --------------------------------------------------------------------------
    def _pending(self) -> RunState:
        log.info("%s", resolved_line(self.run_id, self.config, self.run.config_origin))
        self.splits = self.splits or load_dataset(self.cfg.data)
        return RunState.STARTING

    def _starting(self) -> RunState:
        assert self.splits is not None
        if self.cfg.train.threads and self._threads is None:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(self.cfg.train.threads)
        self.runner, self.plan = self.elastic.build(self.cfg, self.splits, self._bounds)
        self._bounds = self.plan.bounds
        self.run.partition = list(self.plan.bounds)
        self.run.predicted_stage_seconds = list(self.plan.partition.stage_costs)
        if self._resume_state is not None:
            self.runner.load_state_dict(self._resume_state["runner"])
            self._resume_state = None
        elif self.cfg.train.max_restarts and not checkpoint_store.checkpoints(self.ckpt_dir):
            self._save(final=False)  # recovery needs something to go back to from step 1 on
        return RunState.RUNNING

    def _running(self) -> RunState:
        tc = self.cfg.train
        if self._stop:
            self._after_checkpoint = RunState.STOPPED
            return RunState.CHECKPOINTING
        if self.pos.epoch >= tc.epochs or (
            tc.max_steps and self.run.steps >= tc.max_steps and self.epoch is None
        ):
            self.run.test_acc, self.run.test_loss = self._evaluate("test")
            self._after_checkpoint = RunState.SUCCEEDED
            return RunState.CHECKPOINTING
        self.checkpoints.publish(self, self.callbacks)  # writes done since; a cut completed
        epoch = self.epoch or self._open_epoch()
        batch = epoch.next()
        if batch is None or (tc.max_steps and self.run.steps >= tc.max_steps):
            self._close_epoch(epoch, finished=batch is None)
            return RunState.RUNNING
        self._train_batch(epoch, batch)
        if tc.checkpoint_every and self.run.steps % tc.checkpoint_every == 0:
            self._after_checkpoint = RunState.RUNNING
            return RunState.CHECKPOINTING
        return RunState.RUNNING

    def _checkpointing(self) -> RunState:
        if self._after_checkpoint is RunState.RUNNING and self.elastic.grow_due(
            self.cfg, self.runner
        ):
            return self._grow()
        self._save(final=self._after_checkpoint is not RunState.RUNNING)
        return self._after_checkpoint

    def _grow(self) -> RunState:
        """pipeline.elastic, back to the K asked for: the checkpoint due now, then the K'
        stages drained; their state (what a drained checkpoint would hold) is loaded into the
        K stages the next start builds. The epoch goes on where it is: nothing is replayed."""
        assert self.runner is not None
        self._save(final=False)
        done = self.runner.flush()
        if self.epoch is not None:
            self.epoch.tally.add(done)
        self.checkpoints.hand_over()  # a cut the drain completed goes to the writer
        self._resume_state = {"runner": self.runner.state_dict()}
        self._close()  # waits for the checkpoint's write
        self._bounds = self.elastic.bounds_for(self.elastic.asked)
        return RunState.STARTING

    def _recovering(self) -> RunState:
        self._close()  # waits for the writer: the last good checkpoint is complete on disk
        self._restore(checkpoint_store.load(self.ckpt_dir))
        self.restarts += 1
        for cb in self.callbacks:
            cb.on_restart(self)
        return RunState.STARTING

    # -- helpers ------------------------------------------------------------------------------
    def _restore(self, state: dict[str, Any]) -> None:
        self._resume_state = state
        self.pos = Position(**state["position"])
        self.run.epochs = list(state["runlog"]["epochs"])
        self.run.steps = state["runlog"]["steps"]
        self._rng = state["torch_rng"]
        self.epoch = None
        at = f"step {self.run.steps} (epoch {self.pos.epoch + 1}, batch {self.pos.batch})"
        log.info("%s: continuing at %s", self.cfg.rule.label, at)

    def _save(self, *, final: bool) -> None:
        """Snapshot the run now (driver/run/checkpointing.py); the write goes on in the
        background. A final checkpoint is waited for, and its failure fails the run."""
        assert self.runner is not None
        position = {"epoch": self.pos.epoch, "batch": self.pos.batch}
        state = run_part(self.config, position, self.run)
        done = self.checkpoints.take(self.runner, self.ckpt_dir, self.run.steps, state, final=final)
        if self.epoch is not None:
            self.epoch.tally.add(done)
        self.checkpoints.publish(self, self.callbacks, wait=final)

    def _lost_actors(self, exc: Exception) -> RunState:
        self.error = str(exc)
        self.checkpoints.drop()  # a cut the lost stages never finished
        self.checkpoints.publish(self, self.callbacks, wait=True)  # recovery needs it on disk
        action, message = self.failures.after_lost_actors(
            exc,
            restarts=self.restarts,
            has_checkpoint=bool(checkpoint_store.checkpoints(self.ckpt_dir)),
            fresh=self.run.steps == 0 and self._resume_state is None,
            where=str(self.ckpt_dir),
        )
        if action == "fail":
            return self._fail(exc, message)
        self._close()
        if action == "restart":
            log.warning("%s; nothing trained yet, starting the actors again", exc)
            self.restarts += 1
            for cb in self.callbacks:
                cb.on_restart(self)
            return RunState.STARTING
        log.warning("%s; recreating the actors from the last checkpoint", exc)
        return RunState.RECOVERING

    def _fail(self, exc: BaseException, message: str | None = None) -> RunState:
        told, traceback = failure_message(exc)
        message = message or told
        self.error, self._cause = message, exc
        log.error("run %s failed: %s", self.run_id, message, exc_info=exc if traceback else None)
        for cb in self.callbacks:
            cb.on_failure(self, exc)
        return RunState.FAILED

    def _close(self) -> None:
        runner, self.runner = self.runner, None
        try:
            self.checkpoints.drop()  # a cut not yet complete cannot complete now
            self.checkpoints.publish(self, self.callbacks, wait=True)  # before its stages go
        finally:
            try:
                if runner is not None:
                    runner.close()
            finally:
                if self._threads is not None:
                    torch.set_num_threads(self._threads)
                    self._threads = None

    def _close_quietly(self) -> None:
        """Close at a terminal state: the run's outcome stands even if freeing its actors fails."""
        try:
            self._close()
        except Exception:
            log.exception("run %s: closing its runner failed", self.run_id)
        finally:
            self.checkpoints.close()

    # -- the running state's units of work ---------------------------------------------------
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
        entry: dict[str, Any] = {
            "epoch": self.pos.epoch + 1,
            "train_acc": epoch.tally.acc,
            "train_loss": epoch.tally.mean_loss,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "seconds": self.elapsed,
            "train_seconds": self.train_seconds,
        }
        if self.run.exit_val_acc is not None:  # this validation's, just recorded
            entry["exit_val_acc"] = list(self.run.exit_val_acc)
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
        batch, exits = self.cfg.train.batch_size, None
        if self._has_exits and not periodic:  # every early exit in the same pass
            acc, loss, exits = evaluate_exits(self.runner, ds, batch)
        else:
            acc, loss = evaluate(self.runner, ds, batch)
        if not periodic:  # the run log's early exits (None: none), before the callbacks read them
            if split == "val":
                self.run.exit_val_acc = exits
            else:
                self.run.exit_test_acc = exits
        for cb in self.callbacks:
            cb.after_evaluation(self, split, acc, loss, periodic=periodic)
        return acc, loss

    @property
    def _has_exits(self) -> bool:
        """Whether stages below the top have early exits to evaluate: a decoupled run (each
        carries an auxiliary head) on more than one stage."""
        return rule_decoupled(self.cfg.rule) and self.plan is not None and self.plan.k > 1

    def _record(self, reports: list, *, epoch_end: bool = False) -> None:
        self.book.add(reports)
        for cb in self.callbacks:
            cb.after_stage_stats(self, reports)
        if epoch_end or self.run.steps % self.cfg.train.log_every == 0:
            size = self.epoch.size if self.epoch is not None else 1
            epoch = self.pos.epoch + self.pos.batch / max(size, 1)
            self.run.note_alignment(self.book, self.run.steps, epoch)
