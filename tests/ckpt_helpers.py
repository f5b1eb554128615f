"""Helpers shared by the checkpoint and recovery tests: the tiny float64 digits run they train,
batches, every stage's state, deep equality."""

from __future__ import annotations

import itertools

import torch

from driver.data.load import make_loader
from driver.pipeline.stream import StreamPipeline

# a tiny float64 digits run that keeps every checkpoint (exact comparisons, seconds per run)
TINY = [
    "model.width=4",
    "train.epochs=1",
    "train.batch_size=64",
    "train.compare=[]",
    'train.dtype="float64"',
    "train.keep_checkpoints=0",
]
# the chained rule, named: with K > 1 rec-LRA trains decoupled stages unless a rule key says
CHAINED = 'rule.topology="mirror"'
# the same run as an async stream in process, with input noise (its RNG is part of a cut)
CUT = [
    *TINY,
    'pipeline.schedule="async"',
    'pipeline.backend="local"',
    "pipeline.micro_batches=4",
    "rule.input_noise=0.05",
]


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
