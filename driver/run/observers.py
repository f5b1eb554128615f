"""The callbacks every run has: its run log (metrics.json) and, when served, its Prometheus
metrics."""

from __future__ import annotations

from typing import Any

from driver.api.metrics import Metrics
from driver.run.callbacks import TERMINAL, Callback, RunState, RunView
from driver.run.storage import Location
from workers.spec import StageStats


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


class MetricsCallback(Callback):
    """The run's series in `metrics` (driver/api/metrics.py), labelled run=`run_id`."""

    def __init__(self, metrics: Metrics, run_id: str) -> None:
        self.metrics, self.run_id = metrics, run_id
        metrics.register_run(run_id)

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        self.metrics.set_state(self.run_id, current.value)
        if previous is RunState.STARTING and current is RunState.RUNNING:  # a runner was built
            self.metrics.set_stages(self.run_id, len(ctl.run.partition) - 1)

    def after_train_step(self, ctl: RunView, seconds: float, samples: int) -> None:
        self.metrics.step(self.run_id, seconds, samples)

    def after_stage_stats(self, ctl: RunView, reports: list[tuple[int, StageStats]]) -> None:
        self.metrics.stages(self.run_id, reports)

    def after_evaluation(
        self, ctl: RunView, split: str, acc: float, loss: float, *, periodic: bool
    ) -> None:
        if periodic:  # the gauges hold the epoch's validation and the run's test accuracy
            return
        gauge = self.metrics.val_acc if split == "val" else self.metrics.test_acc
        gauge.labels(self.run_id).set(acc)

    def after_checkpoint(self, ctl: RunView, path: Location) -> None:
        self.metrics.checkpoint(self.run_id)

    def on_restart(self, ctl: RunView) -> None:
        self.metrics.restarts.labels(self.run_id).inc()
