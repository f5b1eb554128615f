"""Build the runner a config asks for: stages in this process, or a Ray pipeline of actors."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Protocol

import ray
import torch

from cluster.runtime import connect
from driver.config import Config
from driver.data import DatasetSplits, make_loader
from driver.partition import Partition, plan_partition
from driver.pipeline import LocalPipeline, RayPipeline
from workers.models import model_plan
from workers.runner import LocalRunner, stage_specs
from workers.spec import StageSpec, StageStats

log = logging.getLogger(__name__)

Completed = list[tuple[torch.Tensor, torch.Tensor]]


class Runner(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> Completed: ...
    def flush(self) -> Completed: ...
    def infer(self, x: torch.Tensor) -> torch.Tensor: ...
    def drain_stats(self, *, wait: bool = False) -> list[tuple[int, StageStats]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def base_spec(cfg: Config, splits: DatasetSplits) -> StageSpec:
    """A spec for one stage owning the whole model; partitions cut it into stages."""
    n = len(model_plan(cfg.model, splits.input_shape, splits.num_classes))
    optim = cfg.optim
    if optim.total_steps == 0:  # the schedule spans the whole run
        per_epoch = math.ceil(len(splits.train) / cfg.train.batch_size)  # type: ignore[arg-type]
        total = cfg.train.epochs * per_epoch
        optim = replace(optim, total_steps=min(total, cfg.train.max_steps or total))
    return StageSpec(
        model=cfg.model,
        rule=cfg.rule,
        optim=optim,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        blocks=(0, n),
        seed=cfg.train.seed,
        dtype=cfg.train.dtype,
        device=resolve_device(cfg.train.device),
        diagnose_every=cfg.train.diagnose_every,
    )


class RayRunner(RayPipeline):
    """A RayPipeline that also shuts down the local Ray it started."""

    def __init__(self, specs: list[StageSpec], cfg: Config) -> None:
        self._started = connect(cfg.cluster)
        try:  # a local Ray this run started cannot grow: a placement that cannot fit fails now
            super().__init__(specs, cfg.pipeline, fixed_size=True if self._started else None)
        except BaseException:
            self._stop_ray()
            raise

    def _stop_ray(self) -> None:
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False

    def close(self) -> None:
        super().close()
        self._stop_ray()


def build_runner(
    cfg: Config, splits: DatasetSplits, bounds: tuple[int, ...] | None = None
) -> tuple[Runner, Partition]:
    """The runner for `cfg`; `bounds` reuses a partition already chosen (no profiling)."""
    base = base_spec(cfg, splits)
    pc = cfg.pipeline
    sample = None
    if bounds is not None:
        part = plan_partition(base, pc.stages, tuple(bounds[1:-1]), None, pc.profile_steps)
    elif pc.stages > 1 and not pc.boundaries:
        x, y = next(
            iter(make_loader(splits.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed))
        )
        mb = max(1, len(y) // pc.micro_batches)
        sample = (x[:mb], y[:mb])
        driver_side = base if torch.cuda.is_available() else replace(base, device="cpu")
        driver_side = replace(driver_side, diagnose_every=0)  # time the training, not the probe
        if pc.stages > 1 and pc.backend != "local":  # profile with a stage's thread count
            driver_side = replace(
                driver_side, threads=pc.threads_per_stage or max(1, int(pc.cpus_per_stage))
            )
        part = plan_partition(driver_side, pc.stages, pc.boundaries, sample, pc.profile_steps)
    else:
        part = plan_partition(base, pc.stages, pc.boundaries, None, pc.profile_steps)
    specs = stage_specs(base, list(part.bounds))
    use_ray = pc.backend == "ray" or (pc.backend == "auto" and pc.stages > 1)
    if use_ray:
        return RayRunner(specs, cfg), part
    if base.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device: cuda asked for but no CUDA device is visible here; "
            'set train.device = "cpu" or "auto"'
        )
    if pc.backend == "local" or pc.schedule == "async":  # the pipeline's stream, in process
        return LocalPipeline(specs, pc), part
    return LocalRunner(specs), part
