"""A run's progress for people: a tqdm bar per epoch on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

from driver.run.callbacks import TERMINAL, Callback, RunState, RunView

log = logging.getLogger(__name__)


def bar_wanted(progress: bool = False) -> bool:
    """Bars only where a person watches: stderr is a terminal, or `--progress` asked for them
    (a `ray job submit` log or a CI log would fill with bar redraws)."""
    return progress or sys.stderr.isatty()


class Progress(Callback):
    """bar=True: a tqdm bar per epoch (train accuracy and loss on it). bar=False: one log line
    every train.log_every steps. Both log a line per epoch."""

    def __init__(self, *, bar: bool = False) -> None:
        self.bar = bar
        self._bar: Any = None

    def after_epoch_start(self, ctl: RunView) -> None:
        if self.bar and ctl.epoch is not None:
            self._close()
            self._bar = tqdm(
                total=ctl.epoch.size,
                initial=ctl.epoch.start,
                leave=False,
                unit="step",
                desc=f"{ctl.cfg.rule.label} epoch {ctl.pos.epoch + 1}/{ctl.cfg.train.epochs}",
            )

    def after_train_step(self, ctl: RunView, seconds: float, samples: int) -> None:
        if ctl.epoch is None:
            return
        tally = ctl.epoch.tally
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(acc=f"{tally.acc:.3f}", loss=f"{tally.mean_loss:.3f}")
        elif ctl.run.steps % ctl.cfg.train.log_every == 0:
            log.info(
                "%s step %d (epoch %d/%d, batch %d/%d): train acc %.3f loss %.3f",
                ctl.cfg.rule.label,
                ctl.run.steps,
                ctl.pos.epoch + 1,
                ctl.cfg.train.epochs,
                ctl.pos.batch,
                ctl.epoch.size,
                tally.acc,
                tally.mean_loss,
            )

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        self._close()
        log.info(
            "%s epoch %d: val acc %.4f loss %.4f",
            ctl.cfg.rule.label,
            entry["epoch"],
            entry["val_acc"],
            entry["val_loss"],
        )

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        if current in TERMINAL or current is RunState.RECOVERING:
            self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
