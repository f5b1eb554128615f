"""cluster.errors: the caller's role names the actor in the message; every field survives a
pickle round trip (errors cross process boundaries inside Ray)."""

from __future__ import annotations

import pickle

import pytest

from cluster.errors import ActorDied, ActorError, ActorTimeout


@pytest.mark.parametrize("cls", [ActorError, ActorTimeout, ActorDied])
def test_actor_errors_keep_every_field_through_pickle(cls):
    err = cls(2, "learn failed", "ValueError: boom", "ValueError", role="stage")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.index, back.message, back.cause, back.cause_type, back.role) == (
        2,
        "learn failed",
        "ValueError: boom",
        "ValueError",
        "stage",
    )
    assert str(back) == str(err) == "stage 2: learn failed (ValueError: boom)"


def test_actor_error_role_defaults_to_actor():
    assert str(ActorError(0, "start failed")) == "actor 0: start failed"
