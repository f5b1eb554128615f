"""The pipeline's config: stages, schedule, micro-batches, placement, transport, deadlines."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("sync", "async")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRANSPORTS = ("auto", "object_store", "gloo", "nccl")
ENGINES = ("stream", "p2p")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    stages: int | str = 1  # K; 1 trains in this process; "auto": the K predicted fastest
    backend: str = "auto"  # auto: Ray when stages > 1; ray; local (K stages in this process)
    boundaries: tuple[int, ...] = ()  # explicit cuts (block indices); () balances by profile
    schedule: str = "sync"
    micro_batches: int = 1  # the step's batch is split into this many micro-batches
    max_in_flight: int = 0  # forwards a stage may run ahead of its learns; 0: the stage count
    cpus_per_stage: float = 1.0
    gpus_per_stage: float = -1.0  # -1: one GPU per stage when train.device is cuda, else none
    threads_per_stage: int = 0  # torch threads in each stage; 0: cpus_per_stage (at least 1)
    strategy: str = "PACK"  # placement-group strategy
    placement_timeout_s: float = 120.0
    step_timeout_s: float = 300.0  # deadline of every blocking call to the stages
    profile_steps: int = 3  # micro-batches timed per block when balancing
    apply_every: int = 1  # async: learns per optimizer step (1: each micro-batch; 0: once a step)
    # activations between stages: object_store, or Ray Direct Transport (gloo, nccl); auto:
    # nccl between GPUs, gloo on CPU (3.6x faster than the object store, bench.transport),
    # falling back to the object store where the collective group cannot be made
    transport: str = "auto"
    # when the stages cannot be placed again, go on from the last checkpoint on the largest
    # stage count that fits, and back to `stages` at a checkpoint once it fits again (elastic.py)
    elastic: bool = False
    # stream: the driver submits every op as an actor call (sync and async, checkpoint cuts);
    # p2p: each stage runs a whole step per call and sends to its neighbours itself by
    # torch.distributed, the driver making K calls a step (sync and async, checkpoint cuts;
    # driver/pipeline/p2p.py)
    engine: str = "stream"

    def __post_init__(self) -> None:
        if self.stages != "auto" and not (
            isinstance(self.stages, int) and not isinstance(self.stages, bool) and self.stages >= 1
        ):
            raise ValueError(f'pipeline.stages: an integer >= 1 or "auto", got {self.stages!r}')
        checks = [
            ("micro_batches", self.micro_batches >= 1),
            ("max_in_flight", self.max_in_flight >= 0),
            ("cpus_per_stage", self.cpus_per_stage > 0),
            ("gpus_per_stage", self.gpus_per_stage >= -1),
            ("threads_per_stage", self.threads_per_stage >= 0),
            ("placement_timeout_s", self.placement_timeout_s > 0),
            ("step_timeout_s", self.step_timeout_s > 0),
            ("profile_steps", self.profile_steps >= 1),
            ("apply_every", self.apply_every >= 0),
        ]
        for key, ok in checks:
            if not ok:
                raise ValueError(f"pipeline.{key}: out of range ({getattr(self, key)!r})")
        for key, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("strategy", self.strategy, STRATEGIES),
            ("backend", self.backend, ("auto", "ray", "local")),
            ("transport", self.transport, TRANSPORTS),
            ("engine", self.engine, ENGINES),
        ):
            if value not in allowed:
                raise ValueError(f"pipeline.{key}: {value!r} is not one of {list(allowed)}")
        if self.engine == "p2p" and self.transport == "object_store":
            raise ValueError(
                'pipeline.transport: "object_store" is the stream engine\'s; the p2p engine sends '
                'by gloo or nccl (set transport = "auto")'
            )
        if self.boundaries and (
            self.stages == "auto" or len(self.boundaries) != int(self.stages) - 1
        ):
            raise ValueError(
                f"pipeline.boundaries: {len(self.boundaries)} cuts given for "
                f"{self.stages} stages; give stages - 1 block indices, or none"
            )

    @property
    def window(self) -> int:
        """Forwards a stage may run ahead of its learns (the stage count until resolved)."""
        return self.max_in_flight or (self.stages if isinstance(self.stages, int) else 1)
