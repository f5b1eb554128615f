"""How a run's errors are told apart: lost actors (recoverable), errors that say it all in a
line, and the unexpected (a bug: its type in the message, its traceback in the log)."""

from __future__ import annotations

from cluster.errors import ActorDied, ActorError, ActorTimeout, PlacementError
from driver.data.common import DataError
from driver.run.checkpoint import CheckpointError
from workers.spec import NonFiniteError

RECOVERABLE = (ActorDied, ActorTimeout, PlacementError)
EXPECTED = (ActorError, PlacementError, NonFiniteError, CheckpointError, DataError)


class RunFailed(RuntimeError):
    """The run ended in the failed state; the message says why (stage, layer, step)."""


def failure_message(exc: BaseException) -> tuple[str, bool]:
    """(the one-line message, whether the error was expected)."""
    if isinstance(exc, EXPECTED):
        return str(exc), True
    return f"{type(exc).__name__}: {exc}", False
