"""Cut a model into stages: explicit block boundaries, or balanced from measured block costs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from workers.chain import learns_chained, learns_decoupled, stage_specs, train_chain
from workers.rules import ErrorSignal
from workers.spec import StageSpec
from workers.stage import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]  # [0, b1, ..., n_blocks]
    stage_costs: tuple[float, ...]  # predicted seconds per micro-batch, per stage
    block_names: tuple[str, ...]

    @property
    def balance(self) -> float:
        """Slowest stage over the mean stage: 1.0 is perfect balance."""
        mean = sum(self.stage_costs) / len(self.stage_costs)
        return max(self.stage_costs) / mean if mean > 0 else 1.0

    def describe(self) -> str:
        parts = []
        for i, (a, b) in enumerate(zip(self.bounds, self.bounds[1:], strict=False)):
            names = (
                f"{self.block_names[a]}..{self.block_names[b - 1]}"
                if b - a > 1
                else self.block_names[a]
            )
            cost = 1e3 * self.stage_costs[i]
            parts.append(f"stage {i}: blocks {a}-{b - 1} ({names}) {cost:.2f} ms")
        return "; ".join(parts) + f"; slowest/mean {self.balance:.2f}"


def best_partition(costs: list[float], k: int) -> tuple[int, ...]:
    """The contiguous cut of `costs` into k non-empty parts minimising the largest part's sum
    (exact dynamic programme, O(k n^2)); ties go to the earliest cuts."""
    n = len(costs)
    if not 1 <= k <= n:
        raise ValueError(
            f"pipeline.stages: cannot cut {n} blocks into {k} stages; use at most {n} stages"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: min over cuts of blocks [0, i) into j parts of the largest part
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], prefix[i] - prefix[p])
                if v < best[j][i] - 1e-15:
                    best[j][i], cut[j][i] = v, p
    bounds = [n]
    for j in range(k, 0, -1):
        bounds.append(cut[j][bounds[-1]])
    return tuple(reversed(bounds))


def profile_blocks(base: StageSpec, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """Seconds of forward + learn per micro-batch for each block, measured in this process
    (each block as its own stage, so the costs add up the way stages will run them)."""
    return profile(base, x, y, steps)[0]


def profile(
    base: StageSpec, x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[list[float], list[torch.Tensor]]:
    """profile_blocks' costs, and each block's output for the micro-batch (what a cut after
    that block would send to the next stage). `base` owns the whole model."""
    if learns_decoupled(base):  # the blocks' own work, as the mirror path does it; a stage's
        # auxiliary head (about a quarter of a block) is left out of the balance
        base = replace(base, rule=replace(base.rule, topology="mirror"))
    saved = torch.get_num_threads()  # time blocks with the threads a stage will have
    sync = torch.cuda.synchronize if base.device.startswith("cuda") else (lambda: None)
    try:
        specs = stage_specs(base, list(range(base.blocks[1] + 1)))
        blocks = [_Clocked(Stage(s), sync) for s in specs]
        outs: list[torch.Tensor] = []
        for rep in range(steps + 1):  # the first pass warms up allocators and is not counted
            if rep == 1:
                for block in blocks:
                    block.seconds = 0.0
            outs = train_chain(blocks, rep, x, y, chained=learns_chained(base))
        return [b.seconds / steps for b in blocks], outs
    finally:
        torch.set_num_threads(saved)


def time_whole(base: StageSpec, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Seconds of forward + learn per micro-batch of the whole model in one stage, with the
    threads this process has (what one process, K = 1, would take)."""
    stage = Stage(base)
    for rep in range(steps + 1):
        if rep == 1:
            t0 = time.perf_counter()
        train_chain([stage], rep, x, y, chained=learns_chained(base))
    return (time.perf_counter() - t0) / steps


class _Clocked:
    """A stage whose forward and learn add their seconds (device work included) to `seconds`."""

    def __init__(self, stage: Stage, sync: Callable[[], None]) -> None:
        self.stage, self.sync, self.seconds = stage, sync, 0.0

    def forward(self, mb: Any, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.stage.forward(mb, x)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out

    def learn(self, mb: Any, signal: ErrorSignal, *, apply: bool = False) -> ErrorSignal:
        t0 = time.perf_counter()
        out = self.stage.learn(mb, signal, apply=apply)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out


def plan_partition(
    base: StageSpec,
    k: int,
    boundaries: tuple[int, ...],
    sample: tuple[torch.Tensor, torch.Tensor] | None,
    steps: int,
    costs: list[float] | None = None,
    *,
    names: tuple[str, ...],
) -> Partition:
    """Explicit `boundaries` if given, else the balanced cut of block costs (`costs` as
    profiled already, or profiled here on `sample`). `base` owns the whole model, whose blocks
    are `names`."""
    n = len(names)
    if base.blocks != (0, n):
        raise ValueError(f"plan_partition: {n} block names for a base spec of {base.blocks}")
    if boundaries:
        bounds = (0, *boundaries, n)
        stage_specs(base, list(bounds))  # validates
        costs = profile_blocks(base, *sample, steps) if sample else [0.0] * n
    elif k == 1:
        bounds, costs = (0, n), [0.0] * n
    else:
        if costs is None:
            if sample is None:
                raise ValueError("pipeline: balancing needs a sample batch to profile")
            costs = profile_blocks(base, *sample, steps)
        bounds = best_partition(costs, k)
    stage_costs = tuple(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    part = Partition(bounds=tuple(bounds), stage_costs=stage_costs, block_names=names)
    log.info("partition: %s", part.describe())
    return part
