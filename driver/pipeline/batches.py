"""A step's batch cut into micro-batches that own their memory, to be sent to Ray stages.

`Tensor.chunk` returns views, and a view pickles its whole storage: a micro-batch passed to an
actor call would carry the whole batch, M times its own bytes, and a step's M calls M^2 (at
ImageNet's 224x224, a batch of 2,048 is 1.2 GB: each micro-batch would send all of it). Each
micro-batch here is a copy of its own rows; one copy of the batch in all.
"""

from __future__ import annotations

import torch


def owned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if it is contiguous and spans its whole storage, else a compact copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def split(
    x: torch.Tensor, y: torch.Tensor, micro_batches: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, labels) of `micro_batches` micro-batches (as `Tensor.chunk` cuts), each owned."""
    xs = [owned(c) for c in x.chunk(micro_batches)]
    ys = [owned(c) for c in y.chunk(micro_batches)]
    return xs, ys
