"""Build the runner a config asks for: stages in this process, or a Ray pipeline of actors."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch.utils.data import default_collate

from cluster.runtime import RaySession
from driver.config import Config
from driver.data.common import DatasetSplits
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.partition import Partition, plan_partition, profile, time_whole
from driver.pipeline.plan import PipelinePlan, plan_of
from driver.pipeline.stage_count import choose, cluster_cores, hop_seconds, predict, warn_if_slower
from driver.pipeline.stream import LocalPipeline, RayPipeline
from workers.chain import LocalRunner, stage_specs
from workers.models import model_plan
from workers.spec import StageSpec, StageStats

log = logging.getLogger(__name__)

Completed = list[tuple[torch.Tensor, torch.Tensor]]


class Runner(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> Completed: ...
    def flush(self) -> Completed: ...
    def infer(self, x: torch.Tensor) -> torch.Tensor: ...
    def infer_exits(self, x: torch.Tensor) -> list[torch.Tensor | None]: ...
    def drain_stats(self, *, wait: bool = False) -> list[tuple[int, StageStats]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def block_names(cfg: Config, splits: DatasetSplits) -> tuple[str, ...]:
    """The model's blocks, by name, in order (the units a partition cuts between)."""
    return tuple(name for name, _ in model_plan(cfg.model, splits.input_shape, splits.num_classes))


def base_spec(cfg: Config, splits: DatasetSplits, n_blocks: int | None = None) -> StageSpec:
    """A spec for one stage owning the whole model (of `n_blocks` blocks, counted here if not
    given); partitions cut it into stages."""
    n = len(block_names(cfg, splits)) if n_blocks is None else n_blocks
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
        precision=cfg.train.precision,
        compile=cfg.train.compile,
        device=resolve_device(cfg.train.device),
        diagnose_every=cfg.train.diagnose_every,
        keep_freed_memory=cfg.train.keep_freed_memory,
    )


def build_runner(
    cfg: Config, splits: DatasetSplits, bounds: tuple[int, ...] | None = None
) -> tuple[Runner, PipelinePlan]:
    """The runner for `cfg`, and the plan it resolved (the cut, K, the window); `bounds`
    reuses a partition already chosen (no profiling). `cfg` is only read."""
    names = block_names(cfg, splits)  # the model plan, built once here for the driver
    base = base_spec(cfg, splits, len(names))
    pc = cfg.pipeline
    if bounds is not None:
        part = plan_partition(
            base, len(bounds) - 1, tuple(bounds[1:-1]), None, pc.profile_steps, names=names
        )
    else:
        part = _plan(cfg, base, names, splits)
    specs = stage_specs(base, list(part.bounds))
    use_ray = pc.backend == "ray" or (pc.backend == "auto" and len(specs) > 1)
    if use_ray:
        engine = P2PPipeline if pc.resolved_engine == "p2p" else RayPipeline
        session = RaySession(cfg.cluster)
        try:  # a local Ray this run started cannot grow: a placement that cannot fit fails now
            fixed = True if session.can_grow is False else None
            return engine(specs, pc, fixed_size=fixed, session=session), plan_of(pc, part)
        except BaseException:
            session.close()
            raise
    if base.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device: cuda asked for but no CUDA device is visible here; "
            'set train.device = "cpu" or "auto"'
        )
    if pc.backend == "local" or pc.schedule == "async":  # the pipeline's stream, in process
        return LocalPipeline(specs, pc), plan_of(pc, part)
    return LocalRunner(specs), plan_of(pc, part)


def plan(cfg: Config, splits: DatasetSplits) -> Partition:
    """The partition build_runner chooses for `cfg` without `bounds` (profiled and balanced,
    or pipeline.boundaries), without building anything."""
    names = block_names(cfg, splits)
    return _plan(cfg, base_spec(cfg, splits, len(names)), names, splits)


def profile_sample(cfg: Config, splits: DatasetSplits) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch to profile on: the first training items (as many as a micro-batch of
    a step holds)."""
    batch = min(cfg.train.batch_size, len(splits.train))  # type: ignore[arg-type]
    mb = max(1, batch // cfg.pipeline.micro_batches)
    x, y = default_collate([splits.train[i] for i in range(mb)])
    return x, y


def _plan(cfg: Config, base: StageSpec, names: tuple[str, ...], splits: DatasetSplits) -> Partition:
    """The partition: explicit boundaries, or the balanced cut of profiled blocks into the K
    asked for, or, with pipeline.stages = "auto", into the K predicted fastest (K = 1, one
    process, included). A K predicted slower than one process gets a warning."""
    pc = cfg.pipeline
    k = pc.stages
    if k == 1 or pc.boundaries:
        return plan_partition(base, int(k), pc.boundaries, None, pc.profile_steps, names=names)
    sample = profile_sample(cfg, splits)  # every profile below times this one micro-batch
    driver_side = base if torch.cuda.is_available() else replace(base, device="cpu")
    # time the training, not the probe; and eager blocks: compiling every block of the profile
    # would cost more than the profile (the partition needs relative costs)
    driver_side = replace(driver_side, diagnose_every=0, compile=False)
    whole = driver_side
    if pc.backend != "local":  # profile blocks with a stage's thread count
        threads = pc.threads_per_stage or max(1, int(pc.cpus_per_stage))
        driver_side = replace(driver_side, threads=threads)
    costs, outs = profile(driver_side, *sample, pc.profile_steps)
    if pc.backend != "local":
        cores = cluster_cores(cfg.cluster.address, cfg.cluster.num_cpus)
        most = len(costs) if cores == float("inf") else int(cores // pc.cpus_per_stage)
        single = time_whole(whole, *sample, pc.profile_steps)
        hops = [hop_seconds(o) for o in outs[:-1]]
        ks = {*range(1, min(most, len(costs)) + 1), 1, *([int(k)] if k != "auto" else [])}
        preds = {
            j: predict(
                j,
                costs,
                hops,
                micro_batches=pc.micro_batches,
                cores=cores,
                sync=pc.schedule == "sync",
                single_seconds=single,
                engine=pc.resolved_engine,
            )
            for j in sorted(ks)
        }
        if k == "auto":
            k = choose(list(preds.values())).k
        else:
            warn_if_slower(preds[int(k)], preds[1])
    elif k == "auto":  # PipelineConfig refuses it; kept for configs built around it
        raise ValueError('pipeline.stages: "auto" needs the Ray backend (pipeline.backend)')
    return plan_partition(driver_side, int(k), (), None, pc.profile_steps, costs=costs, names=names)
