"""Micro-batches sent to Ray stages own their memory (driver/pipeline/batches.py).

A `Tensor.chunk` view pickles its whole storage, so every micro-batch sent to a stage used to
carry the whole batch; these tests fail if a micro-batch is a view again."""

from __future__ import annotations

import pickle

import pytest
import torch

from driver.pipeline.batches import owned, split


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("m", [1, 3, 4, 7])
def test_split_cuts_as_chunk_and_each_micro_batch_pickles_only_its_own_rows(m: int) -> None:
    x, y = torch.randn(26, 3, 8, 8), torch.randint(0, 10, (26,))
    xs, ys = split(x, y, m)
    assert len(xs) == len(ys) == len(x.chunk(m))
    for got, want in zip([*xs, *ys], [*x.chunk(m), *y.chunk(m)], strict=True):
        assert torch.equal(got, want) and got.dtype == want.dtype
        assert got.untyped_storage().nbytes() == nbytes(got)
        # the pickle holds the micro-batch's bytes and a small header, not the batch's
        assert len(pickle.dumps(got)) < nbytes(got) + 2048
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)


def test_a_micro_batch_does_not_alias_the_batch() -> None:
    x, y = torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)
    xs, _ = split(x, y, 4)
    x.fill_(1.0)  # the caller reuses its batch buffer: what was cut stays as it was
    assert all(float(c.abs().sum()) == 0.0 for c in xs)


def test_owned_copies_only_what_does_not_span_its_storage() -> None:
    whole = torch.randn(4, 5)
    assert owned(whole) is whole  # nothing to trim: no copy
    for view in (whole[1:3], whole[:, :2], whole.t()):
        out = owned(view)
        assert out is not view and torch.equal(out, view) and out.is_contiguous()
        assert out.untyped_storage().nbytes() == nbytes(out)
