"""The [train] section: epochs, batches, outputs, checkpoints and restarts of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from driver.config.choices import check_choices
from driver.config.locations import location
from workers.bounds import Limits, check_bounds
from workers.rules import RULES
from workers.rules.recipes import variants

TRACKERS = ("tensorboard", "mlflow")
"""Experiment trackers train.trackers may name (driver/run/trackers/)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 12
    """Passes over the training split."""
    batch_size: int = 32
    """Samples per training step (split into pipeline.micro_batches)."""
    seed: int = 0
    """Seeds the weights, the data order and the noise of the run."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameters' and activations' dtype."""
    precision: Literal["float32", "bf16"] = "float32"
    """Arithmetic of forward maps, errors and carries: bf16 runs them under autocast (CUDA,
    or CPU where torch supports it); master weights, error synapses and optimizer state stay in
    train.dtype. Needs train.dtype = "float32"."""
    compile: bool = False
    """Compile each stage's forward maps with torch.compile (docs/training.md says where it
    pays)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where stages compute; auto: cuda when there is one."""
    threads: int = 0
    """Torch threads of the driver process while the run trains (and of stages it runs
    in-process), restored after; 0 keeps torch's setting. Ray stages take
    pipeline.threads_per_stage."""
    keep_freed_memory: bool = True
    """CPU runs: each training process's malloc keeps freed memory for reuse instead of handing
    it back to the kernel, so a step reuses the last step's pages (workers/allocator.py). The
    process keeps its peak resident."""
    out_dir: str = "runs/default"
    """Where the run writes: a local path or a URI (file://, s3://, gs://, memory://)."""
    log_every: int = 50
    """Steps between log summaries (and alignment records)."""
    max_steps: int = 0
    """Stop after this many steps (0: run all epochs)."""
    compare: tuple[str, ...] = ("backprop",)
    """Rules (or presets: rec_lra_paper) trained after the main one for the closing table, each
    with its own recipe and its [compare.<rule>] table."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end of the run)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept (0: all)."""
    max_restarts: int = 2
    """Times a run rebuilds lost stages from its last checkpoint."""
    eval_every_steps: int = 0
    """Extra validation every N steps (0: once per epoch only)."""
    diagnose_every: int = 0
    """Compare each layer's update with backprop's every N steps (0: off; never learned from)."""
    trackers: tuple[str, ...] = ()
    """Experiment trackers the run logs to: "tensorboard" (extra reclra[tensorboard]) and
    "mlflow" (extra reclra[mlflow]). Each writes under train.out_dir."""

    # each numeric key's closed range (workers/bounds.py). Step counts: 10**12 (the most
    # epochs times a step per sample of a big set); seeds: 32 bits.
    LIMITS: ClassVar[Limits] = {
        "epochs": (1, 100_000),
        "batch_size": (1, 65_536),
        "seed": (0, 2**32 - 1),
        "threads": (0, 1024),
        "log_every": (1, 10**12),
        "max_steps": (0, 10**12),
        "checkpoint_every": (0, 10**12),
        "keep_checkpoints": (0, 100_000),
        "max_restarts": (0, 1000),
        "eval_every_steps": (0, 10**12),
        "diagnose_every": (0, 10**12),
    }

    def __post_init__(self) -> None:
        check_choices("train", self)
        for key in ("epochs", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in (
            "threads",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "max_restarts",
            "eval_every_steps",
            "diagnose_every",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        try:
            location(self.out_dir)  # a URI's protocol must be known and its package installed
        except ValueError as exc:
            raise ValueError(f"train.out_dir: {exc}") from None
        for name in self.compare:
            if name not in variants(sorted(RULES)):
                raise ValueError(
                    f"train.compare: unknown rule {name!r}; choose from {variants(sorted(RULES))}"
                )
        if self.precision == "bf16" and self.dtype != "float32":
            raise ValueError(
                f"train.precision: bf16 autocasts float32 weights, got train.dtype = "
                f'{self.dtype!r}; set train.dtype = "float32" or train.precision = "float32"'
            )
        for name in self.trackers:
            if name not in TRACKERS:
                raise ValueError(
                    f"train.trackers: unknown tracker {name!r}; choose from {list(TRACKERS)}"
                )
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"train.trackers: listed twice in {list(self.trackers)}")
        check_bounds("train", self, self.LIMITS)
