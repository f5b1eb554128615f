"""What a run resolves from its [pipeline] config and the model: the cut into stages, the stage
count and each stage's window. The config stays what the user asked for (stages may be
"auto", boundaries empty); the plan is state, rebuilt when the run is rebuilt or resized."""

from __future__ import annotations

from dataclasses import dataclass

from driver.config.pipeline import PipelineConfig
from driver.pipeline.partition import Partition


def window(cfg: PipelineConfig, k: int) -> int:
    """Forwards a stage may run ahead of its learns: pipeline.max_in_flight, or the stage
    count (one-forward-one-learn)."""
    return cfg.max_in_flight or k


@dataclass(frozen=True)
class PipelinePlan:
    partition: Partition  # the cut: block bounds, predicted stage costs, block names
    window: int  # forwards a stage may run ahead of its learns

    @property
    def k(self) -> int:
        """The stage count trained on."""
        return len(self.partition.bounds) - 1

    @property
    def bounds(self) -> tuple[int, ...]:
        return self.partition.bounds


def plan_of(cfg: PipelineConfig, part: Partition) -> PipelinePlan:
    return PipelinePlan(partition=part, window=window(cfg, len(part.bounds) - 1))
