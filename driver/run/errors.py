"""How a run's errors are told apart: lost actors (recoverable), errors that say it all in a
line, and the unexpected (a bug: its type in the message, its traceback in the log)."""

from __future__ import annotations

from cluster.errors import ActorDied, ActorError, ActorTimeout, ClusterError, PlacementError
from driver.data.common import DataError
from driver.run.checkpoint import CheckpointError
from workers.spec import NonFiniteError

RECOVERABLE = (ActorDied, ActorTimeout, PlacementError)
EXPECTED = (ActorError, ClusterError, NonFiniteError, CheckpointError, DataError)


class RunFailed(RuntimeError):
    """The run ended in the failed state; the message says why (stage, layer, step)."""


def failure_message(exc: BaseException) -> tuple[str, bool]:
    """(the one-line message, whether its traceback belongs in the log: not for the expected,
    nor for a ValueError, whose message names the key or value to fix)."""
    if isinstance(exc, EXPECTED):
        return str(exc), False
    return f"{type(exc).__name__}: {exc}", not isinstance(exc, ValueError)
