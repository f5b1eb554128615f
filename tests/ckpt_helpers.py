"""Helpers shared by the checkpoint-cut tests: batches, every stage's state, deep equality."""

from __future__ import annotations

import itertools

import torch

from driver.data.load import make_loader
from driver.pipeline.stream import StreamPipeline


def batches(cfg, digits, n: int) -> list:
    loader = make_loader(digits.train, cfg.train.batch_size, shuffle=True, seed=0, epoch=0)
    return list(itertools.islice(iter(loader), n))


def stage_states(p: StreamPipeline) -> list[dict]:
    futures = [(s, p.stages.state_dict(s)) for s in range(p.k)]
    return p.stages.gather(futures, "state_dict", 60.0)


def assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where
