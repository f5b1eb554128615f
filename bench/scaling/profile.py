"""Measured inputs of the scaling model: per-block forward / learn / apply seconds (each block
timed as its own workers.stage.Stage, one torch thread, as driver/pipeline/partition.py's
profile does, with forward and learn kept apart), the bytes crossing each block boundary, and a
Ray link's call cost, hop latency and hop bandwidth."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from bench.pipeline import variant
from driver.config import Config, load_config
from driver.data.load import load_dataset, make_loader
from driver.pipeline.build import base_spec, block_names
from workers.chain import learns_chained, stage_specs, train_chain
from workers.rules import ErrorSignal
from workers.stage import Stage


@dataclass
class BlockProfile:
    names: tuple[str, ...]
    forward: list[float]  # seconds per micro-batch, per block
    learn: list[float]
    apply: list[float]  # seconds per optimizer step, per block
    out_bytes: list[float]  # bytes of each block's output (a cut after it sends this)
    signal_bytes: list[float]  # bytes of the signal each block sends down after its learn
    micro_batch: int
    chained: bool

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _nbytes(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.numel() * x.element_size())
    if isinstance(x, ErrorSignal):
        return sum(_nbytes(t) for t in (x.output_error, x.boundary))
    return 0.0


class _Timed:
    """A Stage whose forward, learn and apply seconds are kept apart."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.f = self.l = self.a = 0.0
        self.out = self.sent = 0.0

    def forward(self, mb: Any, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.stage.forward(mb, x)
        self.f += time.perf_counter() - t0
        self.out = _nbytes(out)
        return out

    def learn(self, mb: Any, signal: ErrorSignal, *, apply: bool = False) -> ErrorSignal:
        t0 = time.perf_counter()
        out = self.stage.learn(mb, signal, apply=apply)
        self.l += time.perf_counter() - t0
        self.sent = _nbytes(out)
        return out

    def apply(self) -> None:
        t0 = time.perf_counter()
        self.stage.apply()
        self.a += time.perf_counter() - t0


def config_of(overrides: list[str], rule: str, micro_batches: int = 0) -> Config:
    """The config of `overrides` under `rule`; `micro_batches` > 0: that many micro-batches of
    its own micro-batch size (the batch grows with them)."""
    cfg = variant(load_config(None, [*overrides, "train.compare=[]"]), rule)
    if not micro_batches:
        return cfg
    size = cfg.train.batch_size // cfg.pipeline.micro_batches
    return replace(
        cfg,
        train=replace(cfg.train, batch_size=size * micro_batches),
        pipeline=replace(cfg.pipeline, micro_batches=micro_batches),
    )


def sample(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, Any]:
    splits = load_dataset(cfg.data)
    x, y = next(iter(make_loader(splits.train, cfg.train.batch_size, shuffle=True, seed=0)))
    return x, y, splits


def profile_blocks(cfg: Config, reps: int = 4, micro_batches: int = 0) -> BlockProfile:
    """Per-block seconds of one micro-batch (batch / micro_batches samples), one thread; the
    median over `reps` repetitions after one warm-up, each repetition M micro-batches then one
    apply per block (a sync step)."""
    x, y, splits = sample(cfg)
    m = micro_batches or cfg.pipeline.micro_batches
    names = block_names(cfg, splits)
    base = base_spec(cfg, splits, len(names))
    chained = learns_chained(base)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = [_Timed(Stage(s)) for s in stage_specs(base, list(range(len(names) + 1)))]
        per: dict[str, list[list[float]]] = {"f": [], "l": [], "a": []}
        for rep in range(reps + 1):
            for b in blocks:
                b.f = b.l = b.a = 0.0
            for i, (xs, ys) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
                train_chain(blocks, rep * m + i, xs, ys, chained=chained)
            for b in blocks:
                b.apply()
            if rep:
                per["f"].append([b.f / m for b in blocks])
                per["l"].append([b.l / m for b in blocks])
                per["a"].append([b.a for b in blocks])
        med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in per.items()}
        return BlockProfile(
            names=names,
            forward=med["f"],
            learn=med["l"],
            apply=med["a"],
            out_bytes=[b.out for b in blocks],
            signal_bytes=[b.sent for b in blocks],
            micro_batch=len(y) // m,
            chained=chained,
        )
    finally:
        torch.set_num_threads(saved)


class _Peer:
    def noop(self) -> int:
        return 0

    def make(self, n: int) -> torch.Tensor:
        return torch.ones(n)

    def take(self, t: torch.Tensor) -> int:
        return t.numel()


def measure_link(big_bytes: int = 1 << 20, iters: int = 30) -> dict[str, Any]:
    """One actor call's cost (pipelined calls to one actor, per call), the hop latency (half of
    a two-actor make -> take round trip, less its two calls) and the hop bandwidth (gloo Ray
    Direct Transport, the CPU default: the extra seconds of `big_bytes` over 1 element, per
    bench.transport.direct_hop; the object store if gloo cannot be made)."""
    import ray

    from bench.transport import direct_hop

    peers: list[Any] = [ray.remote(num_cpus=0)(_Peer).remote() for _ in range(2)]
    a, b = peers
    try:
        ray.get([a.noop.remote() for _ in range(10)])
        calls = []
        for _ in range(3):
            t0 = time.perf_counter()
            ray.get([a.noop.remote() for _ in range(100)])
            calls.append((time.perf_counter() - t0) / 100)
        call = statistics.median(calls)
        ray.get(b.take.remote(a.make.remote(1)))
        rts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            ray.get(b.take.remote(a.make.remote(1)))
            rts.append(time.perf_counter() - t0)
        rt = statistics.median(rts)
    finally:
        for actor in (a, b):
            ray.kill(actor)
    latency = max(rt - 2 * call, 0.0) / 2
    via = "gloo"
    try:
        extra = direct_hop((big_bytes // 4,), iters)
    except Exception:  # noqa: BLE001 - no collective group here: the object store
        from bench.transport import actor_call_hop

        via, extra = "object_store", actor_call_hop((big_bytes // 4,), iters)
    bandwidth = big_bytes / extra if extra > 0 else float("inf")
    from bench.transport import actor_call_hop

    store = actor_call_hop((big_bytes // 4,), iters)  # a learn's ErrorSignal (a dataclass)
    store_bw = big_bytes / store if store > 0 else float("inf")
    return {
        "call_s": call,
        "round_trip_s": rt,
        "latency_s": latency,
        "bandwidth_Bps": bandwidth,
        "bandwidth_via": via,
        "object_store_bandwidth_Bps": store_bw,
        "big_bytes": big_bytes,
        "big_extra_s": extra,
    }


def _spin(n: int) -> float:
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a * 1e-3)
    return time.perf_counter() - t0


def measure_cores(n: int = 400, procs: int = 2) -> float:
    """Cores this job actually gets now (the machine is shared): a fixed single-thread load in
    `procs` processes at once against one alone, effective cores = procs x t_alone / t_together
    (between 1 and procs)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        pool.map(_spin, [10] * procs)  # start the workers
        alone = pool.apply(_spin, (n,))
        t0 = time.perf_counter()
        pool.map(_spin, [n] * procs)
        together = time.perf_counter() - t0
    return min(max(procs * alone / together, 1.0), float(procs))
