"""What a stage is given (its spec) and what it reports (its stats), and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.models import ModelConfig
from workers.optim import OptimConfig
from workers.rules import RuleConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# train.precision: the dtype forward maps, errors and carries compute in (None: the weights')
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}


class NonFiniteError(FloatingPointError):
    """A non-finite error or update; names the stage, layer and step so the run can stop cleanly."""


class StageStateError(ValueError):
    """A state dict that does not fit this stage (missing or unexpected layers, wrong shapes)."""


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    model: ModelConfig
    rule: RuleConfig
    optim: OptimConfig
    input_shape: tuple[int, ...]
    num_classes: int
    blocks: tuple[int, int]  # [first, last) block indices of the model this stage owns
    index: int = 0
    seed: int = 0
    dtype: str = "float32"
    # "bf16": forward maps, errors and carries run under autocast; weights, E and optimizer
    # state stay in `dtype` (float32)
    precision: str = "float32"
    compile: bool = False  # torch.compile the stage's forward maps (workers/stage.py says which)
    device: str = "cpu"
    max_cached: int = 64  # micro-batches a stage may hold between forward and learn
    threads: int = 0  # torch threads for this stage's process; 0 leaves the process setting
    # on CPU, have this process's malloc keep freed memory for reuse (workers/allocator.py)
    keep_freed_memory: bool = True
    send_to_cpu: bool = False  # return activations and signals on the CPU (between processes)
    diagnose_every: int = 0  # probe backprop's gradient every N steps (0: never); see diagnostics
    apply_every: int = 1  # learn(apply=True) steps the optimizer once per this many learns
    learn_fraction: float = 1.0  # of a training step one micro-batch is (1 / micro-batches)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"train.precision: unknown {self.precision!r}; choose from {list(PRECISIONS)}"
            )
        if PRECISIONS[self.precision] is not None and self.dtype != "float32":
            raise ValueError(
                f"train.precision: {self.precision} autocasts float32 weights, got train.dtype = "
                f'{self.dtype!r}; set train.dtype = "float32" or train.precision = "float32"'
            )


@dataclass
class StageStats:
    forward_seconds: float = 0.0
    learn_seconds: float = 0.0
    local_loss: dict[str, float] = field(default_factory=dict)
    update_norm: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    idle_seconds: float = 0.0  # between the end of one call and the start of the next
    bytes_received: int = 0  # activations and error signals handed to this stage
    staleness: list[int] = field(default_factory=list)  # applies between a forward and its learn
    cached: int = 0  # micro-batches held when the stats were taken
    synapse_angle: dict[str, float] = field(default_factory=dict)  # degrees between E and W
    backprop_cosine: dict[str, float] = field(default_factory=dict)  # local update vs backprop
    # degrees between E and W as training starts (after the weight-mirror phase, if any);
    # reported once, by the first stats of a fresh stage
    start_angle: dict[str, float] = field(default_factory=dict)
    mirror_seconds: float = 0.0  # spent in weight-mirror steps (the phase and interleaved)
    # the most bytes of activations (and, for autograd rules, of what their graphs save) held
    # between forwards and their learns since the last stats
    cached_bytes: int = 0
    # what a resume started fresh because its checkpoint was cut elsewhere: auxiliary heads
    # (decoupled; by the block they sit on) and error synapses (by layer: a stage's bottom
    # layer has none where nothing is sent below it); reported once
    started_fresh: list[str] = field(default_factory=list)
