"""Picklable error types that keep the failing actor's index, its role and the cause."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """Ray could not be reached or started; the message says what to set."""


class PlacementError(ClusterError):
    """The actors' resources could not be reserved before the deadline."""


class ActorError(RuntimeError):
    """An actor failed. `index` is its place in its group and `role` what the caller calls its
    actors ("stage": the message reads "stage 1: ..."); `cause` is the underlying error as text
    (a live exception from another process may not unpickle here)."""

    def __init__(
        self, index: int, message: str, cause: str = "", cause_type: str = "", role: str = "actor"
    ) -> None:
        super().__init__(f"{role} {index}: {message}" + (f" ({cause})" if cause else ""))
        self.index, self.message, self.cause, self.role = index, message, cause, role
        self.cause_type = cause_type  # the class name of the error raised in the actor, if any

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.index, self.message, self.cause, self.cause_type, self.role))


class ActorTimeout(ActorError):
    """An actor did not answer before its deadline; the message names the config key to raise."""


class ActorDied(ActorError):
    """An actor's process is gone (killed, out of memory, node lost)."""
