"""The callbacks every run has: its run log (metrics.json) and, when served, its Prometheus
metrics."""

from __future__ import annotations

from typing import Any

from driver.run.callbacks import TERMINAL, Callback, RunState, RunView
from driver.run.storage import Location


class RunLogWriter(Callback):
    """Writes the run log to `path` (metrics.json, a local path or URI) after every epoch and
    when the run ends; the only writer of that file."""

    def __init__(self, path: Location) -> None:
        self.path = path

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        self.write(ctl)

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        if current in TERMINAL:
            self.write(ctl)

    def write(self, ctl: RunView) -> None:
        run = ctl.run
        run.step_seconds = ctl.train_seconds / max(run.steps, 1)
        run.samples_per_second = ctl.samples / max(ctl.train_seconds, 1e-9)
        run.stages = ctl.book.summary()
        run.synapse_angle_at_start = ctl.book.start_angles()
        run.mirror_seconds = ctl.book.mirror_seconds
        run.restarts = ctl.restarts
        if ctl.state in TERMINAL:
            run.wall_seconds = ctl.elapsed
        if ctl.state is RunState.FAILED:
            run.error = ctl.error
        run.write(self.path)
