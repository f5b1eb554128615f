"""Choices spelled once: a key typed Literal[...] accepts exactly its listed values."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal


def choices(cls: type, key: str) -> tuple[Any, ...]:
    """The values a Literal-typed key of dataclass `cls` accepts (() for any other key)."""
    hint = typing.get_type_hints(cls)[key]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_choices(section: str, obj: Any) -> None:
    """Raise ValueError naming `section.key` for any Literal-typed key set outside its values."""
    for f in dataclasses.fields(obj):
        allowed = choices(type(obj), f.name)
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise ValueError(f"{section}.{f.name}: {value!r} is not one of {list(allowed)}")
