"""Where a benchmark's results go: its table printed, its JSON written (parents made)."""

from __future__ import annotations

import json
from pathlib import Path


def save(result: dict, path: str, table: str = "") -> dict:
    """Print `table` (if any) and write `result` as JSON at `path`; returns `result`."""
    if table:
        print(table)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    return result
