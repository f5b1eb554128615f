"""The Prometheus series of one run: a run callback (driver/run/callbacks.py) that records
the controller's transitions, steps, stage stats, evaluations and checkpoints in Metrics."""

from __future__ import annotations

from driver.api.metrics import Metrics
from driver.config.locations import Location
from driver.run.callbacks import Callback, RunState, RunView
from workers.spec import StageStats


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
        self.metrics.accuracy(self.run_id, split, acc)
        exits = ctl.run.exit_val_acc if split == "val" else ctl.run.exit_test_acc
        if exits is not None:  # a decoupled run on K > 1 stages: every stage's early exit
            self.metrics.exits(self.run_id, split, exits)

    def after_checkpoint(self, ctl: RunView, path: Location) -> None:
        self.metrics.checkpoint(self.run_id)

    def on_restart(self, ctl: RunView) -> None:
        self.metrics.restart(self.run_id)
