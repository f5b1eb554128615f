"""What a stage holds between a forward and its learn, in bytes (StageStats.cached_bytes)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import torch


def cache_bytes(obj: Any, saved: SavedBytes | None = None) -> int:
    """Bytes of the distinct tensor storages in `obj`: tensors, and lists, tuples, dicts and
    dataclasses of them (a block's cache), and in what `saved` counted; a storage two entries
    share counts once."""
    seen: dict[int, int] = {} if saved is None else dict(saved.seen)
    _collect(obj, seen)
    return sum(seen.values())


def _collect(obj: Any, seen: dict[int, int]) -> None:
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, seen)
    elif is_dataclass(obj):
        for f in fields(obj):
            _collect(getattr(obj, f.name), seen)


class SavedBytes:
    """saved_tensors_hooks that count what an autograd graph saves for its backward (an
    autograd rule's cache is that graph)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # storage address -> bytes

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        _collect(t, self.seen)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t
