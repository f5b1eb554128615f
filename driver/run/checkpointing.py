"""Checkpoints that do not stop training: the loop takes a snapshot, a thread writes it.

The training loop pays only for the snapshot: each stage copies its state to CPU at a
consistent point of the stream (driver/pipeline/cut.py), and the run's own part (config, data
position, curves, torch RNG) is captured at once. A writer thread then gathers the stages'
copies, serializes and writes them (checkpoint_store.save: temp file, fsync, rename; a marker after
the object in an object store). At most one checkpoint waits behind the one being written; a
third waits for the oldest. The controller harvests finished writes (Checkpoints.publish): a
published checkpoint is announced then (after_checkpoint), a failed one is logged and counted,
and the last good checkpoint stays what recovery uses.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import logging
import types
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from driver.pipeline.build import Runner
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.stream import StreamPipeline
from driver.run import checkpoint_store
from driver.run.callbacks import Callback
from driver.run.checkpoint_store import CheckpointError
from workers.state import merge_states

log = logging.getLogger(__name__)
WRITE_TIMEOUT_S = 600.0  # deadline of a wait for the writer
Completed = list[tuple[torch.Tensor, torch.Tensor]]


class Snapshot(Protocol):
    @property
    def complete(self) -> bool: ...  # every stage was asked for its state
    def collect(self) -> list[dict[str, Any]]: ...  # the stages' states (waits, with a deadline)


class Taken:
    """A snapshot already in hand (a runner without a stream: its state at a step's end)."""

    complete = True

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def collect(self) -> list[dict[str, Any]]:
        return [self.state]


def take_snapshot(runner: Runner, *, drain: bool) -> tuple[Snapshot, Completed]:
    """A snapshot of `runner` now, and what a drain finished (for the epoch's tally). Only a
    final checkpoint (`drain`), a cut still being taken, or an apply_every that does not
    divide a step's micro-batches drains the stream first; anything else is a cut in flow."""
    if not isinstance(runner, StreamPipeline | P2PPipeline):  # no stream: a step's end
        return Taken(runner.state_dict()), runner.flush()
    done: Completed = []
    if drain or runner.cut_pending or runner.cut_drains:
        done = runner.flush()
    return runner.cut(), done


def run_part(config: dict[str, Any], position: dict[str, int], runlog: Any) -> dict[str, Any]:
    """The run's own part of a checkpoint, captured now (the stages' part is filled in later):
    config, data position, a copy of the curves, the torch RNG."""
    curves = types.SimpleNamespace(epochs=copy.deepcopy(runlog.epochs), steps=runlog.steps)
    return checkpoint_store.run_state(config, {}, position, curves)


@dataclass
class Job:
    directory: Any  # a Path or URI
    step: int
    snap: Snapshot
    state: dict[str, Any]  # run_part's; the writer fills in the stages' part
    final: bool = False  # the run's last checkpoint: its failure fails the run


@dataclass
class Outcome:
    job: Job
    where: Any  # the published checkpoint (a Path or URI), None when the write failed
    error: BaseException | None = None


def _write(job: Job, keep: int) -> Any:
    job.state["runner"] = merge_states(job.snap.collect())
    return checkpoint_store.save(job.directory, job.step, job.state, keep=keep)


class CheckpointWriter:
    """One writer thread, at most one checkpoint waiting behind the one it writes."""

    def __init__(self, *, keep: int, timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self.keep, self.timeout_s = keep, timeout_s
        self._pool: cf.ThreadPoolExecutor | None = None
        self._jobs: deque[tuple[Job, cf.Future]] = deque()  # oldest first, until harvested

    @property
    def pending(self) -> int:
        """Checkpoints queued or being written."""
        return sum(not f.done() for _, f in self._jobs)

    def submit(self, job: Job) -> None:
        """Queue a complete snapshot for writing; with one already waiting behind the write in
        progress, first wait for that write (the loop never holds more than two)."""
        assert job.snap.complete
        while self.pending >= 2:
            self._wait([next(f for _, f in self._jobs if not f.done())])
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="reclra-ckpt")
        self._jobs.append((job, self._pool.submit(_write, job, self.keep)))

    def _wait(self, futures: list[cf.Future]) -> None:
        _, late = cf.wait(futures, timeout=self.timeout_s)
        if late:
            job = next(j for j, f in self._jobs if f in late)
            raise CheckpointError(
                f"checkpoint: writing step {job.step} to {job.directory} did not finish within "
                f"{self.timeout_s:g}s; check the storage"
            )

    def finished(self, *, wait: bool = False) -> list[Outcome]:
        """The outcomes of the writes done, oldest first (`wait`: of every write queued)."""
        if wait and self._jobs:
            self._wait([f for _, f in self._jobs])
        out: list[Outcome] = []
        while self._jobs and self._jobs[0][1].done():
            job, future = self._jobs.popleft()
            error = future.exception()
            out.append(Outcome(job, None if error else future.result(), error))
        return out

    def close(self) -> None:
        """Let the thread go (a write still running finishes; call finished(wait=True) first
        to know how it went)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class Checkpoints:
    """A run's checkpoints: the snapshot still being taken (a cut completes as the stream
    flows on), the writer, and what was published. The controller checkpoints through it."""

    def __init__(self, *, keep: int, timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self.writer = CheckpointWriter(keep=keep, timeout_s=timeout_s)
        self._taking: Job | None = None  # its snapshot is not complete yet
        self.published = self.failed = 0
        self.last_good: Any = None

    def take(
        self, runner: Runner, directory: Any, step: int, state: dict[str, Any], *, final: bool
    ) -> Completed:
        """Snapshot `runner` for the checkpoint of `step` (`state`: run_part's); returns what a
        drain finished. A final checkpoint drains the stream; so does a new checkpoint while a
        cut is still being taken (which then goes to the writer first)."""
        snap, done = take_snapshot(runner, drain=final)
        self.hand_over()
        self._taking = Job(directory, step, snap, state, final)
        self.hand_over()
        return done

    def hand_over(self) -> None:
        """Give the snapshot being taken to the writer once it is complete."""
        if self._taking is not None and self._taking.snap.complete:
            job, self._taking = self._taking, None
            self.writer.submit(job)

    def drop(self) -> None:
        """Abandon a snapshot not yet complete (its stages are gone)."""
        self._taking = None

    def publish(self, ctl: Any, callbacks: Sequence[Callback], *, wait: bool = False) -> None:
        """Announce the checkpoints written since the last call (after_checkpoint); log and
        count those that failed (`wait`: every queued write first). A failed final checkpoint
        raises CheckpointError: the run cannot end without its state kept."""
        self.hand_over()
        for out in self.writer.finished(wait=wait):
            if out.error is None:
                self.published += 1
                self.last_good = out.where
                for cb in callbacks:
                    cb.after_checkpoint(ctl, out.where)
                continue
            self.failed += 1
            cause = f"{type(out.error).__name__}: {out.error}".replace("\n", " ")
            where = f"step {out.job.step} to {out.job.directory}"
            if out.job.final:
                raise CheckpointError(
                    f"checkpoint: writing the final one, {where}, failed: {cause}"
                )
            log.warning(
                "checkpoint: writing %s failed (%s); the last good checkpoint stays %s",
                where,
                cause,
                self.last_good or "the one before",
            )

    def close(self) -> None:
        self.drop()
        self.writer.close()
