"""What a run tells an experiment tracker, whichever it is: scalars named after the run log's
fields (metrics.json), each at the training step it belongs to; the resolved config; the end.

Tags, every one at a training step (batches trained) so all curves share one axis:
  epoch/<key>              each number of an epoch's entry (train_acc, train_loss, val_acc,
                           val_loss, seconds, train_seconds, epoch; test_acc with track_test;
                           exit_val_acc/<i> per stage), at the step that ended the epoch
  evals/val_acc, val_loss  train.eval_every_steps validations
  stages/<k>/<stat>        each stage's running totals (driver/run/stats.py), at each epoch's end
  alignment/<what>/<layer> synapse_angle_deg and backprop_cosine records (train.log_every)
  final/<key>              test_acc, test_loss, exit_test_acc/<i>, step_seconds,
                           samples_per_second, wall_seconds, steps, restarts, mirror_seconds
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from driver.config import Config, config_to_dict
from driver.run.callbacks import TERMINAL, Callback, RunState, RunView

log = logging.getLogger(__name__)
# the run log's fields logged as final/<key> when the run ends
FINAL = (
    "test_acc",
    "test_loss",
    "exit_test_acc",
    "step_seconds",
    "samples_per_second",
    "wall_seconds",
    "steps",
    "restarts",
    "mirror_seconds",
)


class Sink(Protocol):
    """Where one tracker writes. open() may raise (the run fails at its start); an error from
    any other call stops that tracker for the rest of the run, with a warning."""

    name: str  # the tracker, as train.trackers names it
    where: str  # where it writes, for messages

    def open(self, cfg: Config, run_id: str) -> None: ...
    def scalars(self, values: dict[str, float], step: int) -> None: ...
    def restart(self, step: int) -> None: ...  # training goes on from `step`; later ones replay
    def flush(self) -> None: ...
    def close(self, state: RunState, error: str | None, final: dict[str, float]) -> None: ...


def params(cfg: Config) -> dict[str, Any]:
    """The resolved config flat, {"section.key": value}: every key of every section, and each
    compared rule's own tables as compare.<rule>.<section>.<key>."""
    out = {f"{s}.{k}": v for s, values in config_to_dict(cfg).items() for k, v in values.items()}
    for rule, tables in cfg.compare.items():
        for section, values in tables.items():
            out |= {f"compare.{rule}.{section}.{k}": v for k, v in values.items()}
    return out


def numbers(prefix: str, value: Any) -> dict[str, float]:
    """Every number in `value` under a tag: a number as `prefix`, a list's items as
    prefix/<index>, a table's values as prefix/<key> (recursively); anything else is left out."""
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, int | float):
        return {prefix: float(value)}
    if isinstance(value, list | tuple):
        items: Any = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return {}
    out: dict[str, float] = {}
    for key, item in items:
        out |= numbers(f"{prefix}/{key}", item)
    return out


class TrackerCallback(Callback):
    """A run's curves, stats, alignment and config, sent to one tracker's `sink` as the run
    goes. The sink opens as the run starts (after its data loaded: a queued or cancelled run
    logs nothing) and closes with the run's end state."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.opened = self.broken = False
        self.aligned_to = 0  # the step of the last alignment record sent

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        if previous is RunState.PENDING and current is RunState.STARTING:
            self._open(ctl)
        elif current in TERMINAL and self.opened:
            self._write(lambda: self._end(ctl))

    def after_train_step(self, ctl: RunView, seconds: float, samples: int) -> None:
        self._write(lambda: self._alignment(ctl))

    def after_evaluation(
        self, ctl: RunView, split: str, acc: float, loss: float, *, periodic: bool
    ) -> None:
        if periodic and split == "val":  # the per-epoch test (track_test) is in the epoch entry
            values = {"evals/val_acc": acc, "evals/val_loss": loss}
            self._write(lambda: self.sink.scalars(values, ctl.run.steps))

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        def send() -> None:
            self._alignment(ctl)
            values = numbers("epoch", entry) | numbers("stages", ctl.book.summary())
            self.sink.scalars(values, ctl.run.steps)
            self.sink.flush()

        self._write(send)

    def on_restart(self, ctl: RunView) -> None:
        self.aligned_to = min(self.aligned_to, ctl.run.steps)
        self._write(lambda: self.sink.restart(ctl.run.steps))

    # -- helpers ------------------------------------------------------------------------------
    def _open(self, ctl: RunView) -> None:
        try:
            self.sink.open(ctl.cfg, ctl.run_id)
        except Exception as exc:
            raise RuntimeError(
                f"train.trackers: {self.sink.name} could not start logging to {self.sink.where}: "
                f"{_line(exc)}"
            ) from exc
        self.opened = True

    def _alignment(self, ctl: RunView) -> None:
        """Send the alignment records noted since the last ones sent, oldest first."""
        records = ctl.run.alignment
        start = len(records)
        while start > 0 and records[start - 1]["step"] > self.aligned_to:
            start -= 1
        for rec in records[start:]:
            what = {k: rec[k] for k in ("synapse_angle_deg", "backprop_cosine")}
            self.sink.scalars(numbers("alignment", what), rec["step"])
            self.aligned_to = rec["step"]

    def _end(self, ctl: RunView) -> None:
        self._alignment(ctl)
        run = ctl.run
        final = numbers("final", {k: getattr(run, k) for k in FINAL})
        self.sink.scalars(final, run.steps)
        self.sink.close(ctl.state, ctl.error, final)

    def _write(self, send: Callable[[], None]) -> None:
        """Run `send` unless this tracker has failed; a failure stops it, with one warning:
        the run goes on (metrics.json keeps every curve)."""
        if not self.opened or self.broken:
            return
        try:
            send()
        except Exception as exc:
            self.broken = True
            log.warning(
                "train.trackers: %s stopped logging to %s (%s); the run goes on, its curves "
                "are in metrics.json",
                self.sink.name,
                self.sink.where,
                _line(exc),
            )


def _line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 400 else text[:397] + "..."
