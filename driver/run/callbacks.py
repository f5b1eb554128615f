"""What observes a run: its states, the view a callback gets of the controller, and the hooks.

Modelled on Ray Train v2's controller callbacks: the controller only steps states and calls
these hooks; metrics, the run log, progress and the service's watchers are callbacks.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from driver.config import Config
from driver.run.epochs import Epoch, Position
from driver.run.run_log import RunLog
from driver.run.stats import StatsBook

if TYPE_CHECKING:
    from workers.spec import StageStats


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


class RunView(Protocol):
    """What a callback may read of the controller (and must not change)."""

    @property
    def cfg(self) -> Config: ...
    @property
    def run_id(self) -> str: ...
    @property
    def state(self) -> RunState: ...
    @property
    def pos(self) -> Position: ...
    @property
    def run(self) -> RunLog: ...  # the curves; steps counts the batches trained
    @property
    def book(self) -> StatsBook: ...  # the stages' running totals
    @property
    def epoch(self) -> Epoch | None: ...  # the epoch being trained, if one is open
    @property
    def restarts(self) -> int: ...
    @property
    def error(self) -> str | None: ...  # why it failed (or what it recovered from last)
    @property
    def train_seconds(self) -> float: ...  # time in training steps and epoch-end flushes
    @property
    def samples(self) -> int: ...  # training samples seen
    @property
    def elapsed(self) -> float: ...  # wall seconds since the controller was made


class Callback:
    """Hooks a controller calls; each is a no-op here, so a callback overrides what it needs.
    A hook that raises fails the run like any other error (entering a terminal state, where
    the run has ended, its error propagates from step())."""

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        """After every step (running -> running is one batch or one evaluation). Entering a
        terminal state, the runner is already closed."""

    def after_epoch_start(self, ctl: RunView) -> None:
        """An epoch's batches are open: ctl.epoch has its size and the batch it starts at."""

    def after_train_step(self, ctl: RunView, seconds: float, samples: int) -> None:
        """One batch trained, in `seconds` wall time; ctl.epoch.tally has the train accuracy."""

    def after_stage_stats(self, ctl: RunView, reports: list[tuple[int, StageStats]]) -> None:
        """The stages' stats of the last step (or the epoch-end flush), as drained."""

    def after_evaluation(
        self, ctl: RunView, split: str, acc: float, loss: float, *, periodic: bool
    ) -> None:
        """An evaluation on `split` ("val" or "test"): the epoch's validation and the run's
        final test have periodic=False; train.eval_every_steps validations and the per-epoch
        test of benchmarks (track_test) have periodic=True."""

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        """An epoch (or the part max_steps allowed) ended; `entry` is appended to run.epochs."""

    def after_checkpoint(self, ctl: RunView, path: Path | str) -> None:
        """A checkpoint was written at `path`."""

    def on_restart(self, ctl: RunView) -> None:
        """Lost actors: the run went back to its last checkpoint (ctl.restarts counts)."""

    def on_failure(self, ctl: RunView, error: BaseException) -> None:
        """The run fails (ctl.error says why, in a line); the failed transition follows."""
