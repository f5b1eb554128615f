"""What users and operators talk to: the Python API, the CLI's service (gRPC), Prometheus
metrics, reports.

`from driver import api` stays light: api.train, api.compare, api.config and the rest of the
Python API (driver/api/python.py, docs/python.md) load with torch on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from driver.api.python import (
        Callback,
        Comparison,
        Config,
        OldRunError,
        Result,
        RunFailed,
        RunState,
        RunView,
        accuracy,
        compare,
        config,
        load_data,
        train,
        with_rule,
    )

__all__ = [
    "Callback",
    "Comparison",
    "Config",
    "OldRunError",
    "Result",
    "RunFailed",
    "RunState",
    "RunView",
    "accuracy",
    "compare",
    "config",
    "load_data",
    "train",
    "with_rule",
]


def __getattr__(name: str) -> Any:
    """The Python API's names, imported on first use."""
    if name in __all__:
        return getattr(importlib.import_module("driver.api.python"), name)
    raise AttributeError(f"module 'driver.api' has no attribute {name!r}")
