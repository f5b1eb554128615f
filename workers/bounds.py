"""Bounds on a config section's numeric keys. Each frozen config dataclass declares, next to its
fields, the closed range every int and float key may take::

    LIMITS: ClassVar[Limits] = {"width": (1, 4096), "lr": (0.0, 100.0)}

and calls ``check_bounds("model", self, self.LIMITS)`` at the end of its ``__post_init__``
(after its own checks, whose messages stay the ones users see for what they catch). A key's
bound applies to its value when that value is a number (a key typed ``int | str`` is bounded
only when numeric) and to each element of a tuple of numbers. Floats must also be finite. A
numeric key without a bound, or a bound on no key, is a bug in the dataclass: LookupError."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

Limits = Mapping[str, tuple[float, float]]
"""{key: (low, high)}: the closed range of a section's numeric key (ints may be given)."""


def check_bounds(section: str, obj: Any, limits: Limits) -> None:
    """Raise ValueError, one line naming `section.key`, the bound and the fix, for a numeric
    field of dataclass `obj` that is NaN or infinite or lies outside its [low, high]."""
    names = [f.name for f in dataclasses.fields(obj)]
    stray = sorted(set(limits) - set(names))
    if stray:
        raise LookupError(f"{section}: LIMITS names no key {stray}; drop it or fix the name")
    for name in names:
        value = getattr(obj, name)
        items = list(enumerate(value)) if isinstance(value, tuple | list) else [(None, value)]
        for index, item in items:
            if not _is_number(item):
                continue
            key = f"{section}.{name}" if index is None else f"{section}.{name}[{index}]"
            if name not in limits:
                raise LookupError(
                    f"{key}: a numeric key without a bound; declare one in "
                    f"{type(obj).__name__}.LIMITS"
                )
            _check(key, item, *limits[name])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(key: str, value: float, low: float, high: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}: {value} is not a finite number; set a finite value")
    if value > high:
        raise ValueError(
            f"{key}: {_show(value)} is above the bound {_show(high)}; use at most {_show(high)}"
        )
    if value < low:
        raise ValueError(
            f"{key}: {_show(value)} is below the bound {_show(low)}; use at least {_show(low)}"
        )


def _show(x: float) -> str:
    """`x` for a one-line message: whole bounds without a trailing .0, and a huge integer by
    its size (str() of one past 4,300 digits raises)."""
    if isinstance(x, int) and abs(x) >= 10**30:
        digits = int(abs(x).bit_length() * math.log10(2)) + 1
        return f"{'a negative' if x < 0 else 'an'} integer of about {digits} digits"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return str(x)
