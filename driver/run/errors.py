"""How a run's errors are told apart: lost actors (recoverable), errors that say it all in a
line, and the unexpected (a bug: its type in the message, its traceback in the log)."""

from __future__ import annotations

from cluster.errors import ActorDied, ActorError, ActorTimeout, ClusterError, PlacementError
from driver.data.common import DataError
from driver.run.checkpoint_store import CheckpointError
from workers.compiled import CompileError
from workers.spec import NonFiniteError

RECOVERABLE = (ActorDied, ActorTimeout, PlacementError)
EXPECTED = (ActorError, ClusterError, NonFiniteError, CheckpointError, DataError, CompileError)


class RunFailed(RuntimeError):
    """The run ended in the failed state; the message says why (stage, layer, step)."""


def failure_message(exc: BaseException) -> tuple[str, bool]:
    """(the one-line message, whether its traceback belongs in the log: not for the expected,
    nor for a ValueError, whose message names the key or value to fix)."""
    if isinstance(exc, EXPECTED):
        return str(exc), False
    return f"{type(exc).__name__}: {exc}", not isinstance(exc, ValueError)


class FailurePolicy:
    """What a run does when its actors are lost (died, hung, or could not be placed): go back
    to the last checkpoint while restarts are left, start over when nothing was trained yet,
    else fail, saying why in a line. It decides; the controller acts."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts

    def after_lost_actors(
        self, exc: BaseException, *, restarts: int, has_checkpoint: bool, fresh: bool, where: str
    ) -> tuple[str, str | None]:
        """("recover" | "restart" | "fail", the failure's message or None). `fresh`: nothing
        was trained and nothing resumed; `where`: the checkpoint folder, for the message."""
        if restarts >= self.max_restarts:
            return "fail", f"{exc}; no restarts left (train.max_restarts = {self.max_restarts})"
        if has_checkpoint:
            return "recover", None
        if fresh:
            return "restart", None
        return "fail", f"{exc}; no checkpoint to recover from in {where}"
