"""Picklable error types that keep the failing stage's index and the cause."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """Ray could not be reached or started; the message says what to set."""


class PlacementError(ClusterError):
    """The actors' resources could not be reserved before the deadline."""


class StageError(RuntimeError):
    """A stage failed. `stage` is its index; `cause` is the underlying error as text (a live
    exception from another process may not unpickle here)."""

    def __init__(self, stage: int, message: str, cause: str = "", cause_type: str = "") -> None:
        super().__init__(f"stage {stage}: {message}" + (f" ({cause})" if cause else ""))
        self.stage, self.message, self.cause = stage, message, cause
        self.cause_type = cause_type  # the class name of the error raised in the stage, if any

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.stage, self.message, self.cause, self.cause_type))


class StageTimeout(StageError):
    """A stage did not answer before its deadline; the message names the config key to raise."""


class StageDied(StageError):
    """A stage's actor process is gone (killed, out of memory, node lost)."""
