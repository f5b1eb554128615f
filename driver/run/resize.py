"""Growing back to the stage count asked for (`pipeline.elastic`, driver/pipeline/elastic.py):
at a checkpoint, once the cluster can hold the K stages asked for again, the run writes that
checkpoint as usual, drains its K' stages and starts K stages from their state. The epoch goes
on where it is: nothing is replayed. The Controller inherits it."""

from __future__ import annotations

from typing import Any, Protocol

from driver.config import Config
from driver.pipeline.build import Runner
from driver.pipeline.elastic import Elastic
from driver.run.callbacks import RunState
from driver.run.ckpt_writer import Checkpoints
from driver.run.epochs import Epoch


class _Growing(Protocol):
    """What the grow-back step uses of the Controller that inherits it."""

    cfg: Config
    runner: Runner | None
    epoch: Epoch | None
    elastic: Elastic
    checkpoints: Checkpoints
    _bounds: tuple[int, ...] | None
    _resume_state: dict[str, Any] | None

    def _save(self, *, final: bool) -> None: ...
    def _close(self) -> None: ...


class Resizing:
    """The grow-back step, inherited by the Controller (which provides what _Growing lists)."""

    _bounds: tuple[int, ...] | None
    _resume_state: dict[str, Any] | None

    def _grow_due(self: _Growing) -> bool:
        return self.elastic.grow_due(self.cfg, self.runner)

    def _grow(self: _Growing) -> RunState:
        """The checkpoint due now, then the K' stages drained; their state (what a drained
        checkpoint would hold) is loaded into the K stages the next start builds."""
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
