"""The [pipeline] section: stages, schedule, micro-batches, placement, transport, deadlines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from driver.config.choices import check_choices
from workers.bounds import Limits, check_bounds


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    stages: int | str = 1
    """K, the stages the model is cut into; 1 trains in this process; "auto": the K predicted
    fastest on this cluster (1 included)."""
    backend: Literal["auto", "ray", "local"] = "auto"
    """auto: Ray when stages > 1; ray; local (K stages in this process, for tests)."""
    boundaries: tuple[int, ...] = ()
    """Block indices to cut at (stages - 1 of them); () balances the cut by profiling."""
    schedule: Literal["sync", "async"] = "sync"
    """sync: every micro-batch of a step sees the step's weights (one process's result);
    async: updates as errors arrive, no flush between steps."""
    micro_batches: int = 1
    """The step's batch is split into this many micro-batches."""
    max_in_flight: int = 0
    """Forwards a stage may run ahead of its learns; 0: the stage count."""
    cpus_per_stage: float = 1.0
    """The CPUs of each stage's placement-group bundle."""
    gpus_per_stage: float = -1.0
    """GPUs per stage; -1: one each when train.device is cuda, else none."""
    threads_per_stage: int = 0
    """Torch threads in each stage; 0: cpus_per_stage (at least 1)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """The placement group's strategy."""
    placement_timeout_s: float = 120.0
    """How long a cluster that can grow is waited for to place the stages."""
    step_timeout_s: float = 300.0
    """The deadline of every blocking call to the stages."""
    profile_steps: int = 3
    """Micro-batches timed per block when balancing the cut."""
    apply_every: int = 1
    """async: learns per optimizer step (1: each micro-batch; 0: once a step)."""
    transport: Literal["auto", "object_store", "gloo", "nccl"] = "auto"
    """Activations between stages: the object store, or Ray Direct Transport (gloo, nccl);
    auto: nccl between GPUs, gloo on CPU, the object store where no collective group forms."""
    elastic: bool = False
    """When the stages cannot be placed again, go on from the last checkpoint on the largest
    stage count that fits, and back to `stages` at a checkpoint once it fits again."""
    engine: Literal["auto", "stream", "p2p"] = "auto"
    """How stages on Ray are driven. p2p: each stage runs a whole step per call and sends to
    its neighbours itself (torch.distributed), K calls a step; stream: the driver submits every
    op as an actor call. auto: p2p (faster wherever measured, docs/pipeline.md), except where
    only stream runs: stages in this process (backend local), the object-store transport, and
    nccl between stages that share a GPU."""

    # each numeric key's closed range (workers/bounds.py); the run's block count bounds stages
    # and boundaries (each cut) further. Deadlines: a week at most.
    LIMITS: ClassVar[Limits] = {
        "stages": (1, 256),
        "boundaries": (1, 1024),
        "micro_batches": (1, 65_536),
        "max_in_flight": (0, 65_536),
        "cpus_per_stage": (0.0, 1024.0),
        "gpus_per_stage": (-1.0, 64.0),
        "threads_per_stage": (0, 1024),
        "placement_timeout_s": (0.0, 604_800.0),
        "step_timeout_s": (0.0, 604_800.0),
        "profile_steps": (1, 10_000),
        "apply_every": (0, 65_536),
    }

    @property
    def resolved_engine(self) -> Literal["stream", "p2p"]:
        """The engine `engine` stands for with the rest of this section."""
        if self.engine != "auto":
            return self.engine
        shared_gpu = self.transport == "nccl" and 0 <= self.gpus_per_stage < 1
        if self.backend == "local" or self.transport == "object_store" or shared_gpu:
            return "stream"
        return "p2p"

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
        check_choices("pipeline", self)
        if self.engine == "p2p" and self.backend == "local":
            raise ValueError(
                'pipeline.engine: "p2p" runs its stages as Ray actors; set pipeline.backend = '
                '"auto" or "ray", or engine = "stream" for stages in this process'
            )
        if self.stages == "auto" and self.backend == "local":
            raise ValueError('pipeline.stages: "auto" needs the Ray backend (pipeline.backend)')
        if self.engine == "p2p" and self.transport == "nccl" and 0 <= self.gpus_per_stage < 1:
            raise ValueError(
                "pipeline.transport: nccl needs a whole GPU per stage (it refuses two ranks on "
                'one device); set pipeline.gpus_per_stage = 1, or transport = "gloo"'
            )
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
        check_bounds("pipeline", self, self.LIMITS)
