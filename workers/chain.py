"""In-process runner: the stages of one model chained in this process (K = 1, tests, debugging)."""

from __future__ import annotations

from dataclasses import replace

import torch

from workers.models import model_plan
from workers.rules import ErrorSignal
from workers.spec import StageSpec, StageStats
from workers.stage import Stage


def stage_specs(base: StageSpec, bounds: list[int]) -> list[StageSpec]:
    """Specs for stages cut at `bounds` (block indices: [0, b1, ..., n_blocks])."""
    n = len(model_plan(base.model, base.input_shape, base.num_classes))
    if (
        bounds[0] != 0
        or bounds[-1] != n
        or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    ):
        raise ValueError(f"pipeline.boundaries: {bounds} must rise strictly from 0 to {n} blocks")
    return [
        replace(base, blocks=(a, b), index=i)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
    ]


class LocalRunner:
    """Runs training steps over in-process stages, in `sync` order: every micro-batch of a step
    sees the step's starting weights, and each stage applies once at the end of the step."""

    def __init__(self, specs: list[StageSpec]) -> None:
        self.stages = [Stage(s) for s in specs]

    def step(
        self, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One training step; returns [(logits, labels)] of its forward (for train accuracy)."""
        logits = []
        for mb, (xs, ys) in enumerate(
            zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)
        ):
            out = xs
            for stage in self.stages:
                out = stage.forward(mb, out)
            logits.append(out)
            signal = ErrorSignal(labels=ys)
            for stage in reversed(self.stages):
                below = stage.learn(mb, signal)
                signal = replace(below, labels=None)
        for stage in self.stages:
            stage.apply()
        return [(torch.cat(logits), y)]

    def flush(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return []  # every step is complete when it returns

    def drain_stats(self, *, wait: bool = False) -> list[tuple[int, StageStats]]:
        return [(i, stage.pop_stats()) for i, stage in enumerate(self.stages)]

    def close(self) -> None:
        for stage in self.stages:
            stage.drop_cache()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.infer(x)
        return x

    def state_dict(self) -> dict:
        units: dict = {}
        for stage in self.stages:
            units.update(stage.state_dict()["units"])
        first = self.stages[0].state_dict()
        return {"units": units, "step": first["step"], "noise_rng": first["noise_rng"]}

    def load_state_dict(self, state: dict) -> None:
        for stage in self.stages:
            stage.load_state_dict(state)
