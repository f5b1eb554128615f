"""What a run records: its curves and stats (RunLog), evaluation, and train accuracy tallies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from driver.data.load import make_loader
from driver.pipeline.build import Completed, Runner
from driver.run import storage
from driver.run.stats import StatsBook
from driver.run.storage import Location


@dataclass
class RunLog:
    """The curves of one run, written as JSON after every epoch."""

    rule: str
    config: dict[str, Any]  # the resolved config the run trained with
    # where each [rule] and [optim] value came from: "user" or "recipe" (absent: the default)
    config_origin: dict[str, str] = field(default_factory=dict)
    partition: list[int] = field(default_factory=list)
    predicted_stage_seconds: list[float] = field(default_factory=list)  # per micro-batch
    # per epoch: epoch, train_acc, train_loss, val_acc, val_loss, seconds, train_seconds
    # (test_acc with track_test; exit_val_acc when exit accuracies are recorded, see below)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    test_acc: float | None = None
    test_loss: float | None = None
    # early-exit accuracy per stage, stage order (a decoupled run on K > 1 stages: each stage's
    # auxiliary head; the last is the model's, test_acc / val_acc), at the test and at the
    # latest epoch's validation (the final one once the run ends); None for other runs
    exit_test_acc: list[float] | None = None
    exit_val_acc: list[float] | None = None
    step_seconds: float = 0.0
    samples_per_second: float = 0.0
    steps: int = 0
    wall_seconds: float = 0.0
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)  # extra validations by step
    restarts: int = 0
    error: str | None = None
    # every train.log_every steps and at each epoch's end: {step, epoch, synapse_angle_deg,
    # backprop_cosine}, the latest value per layer (backprop_cosine: layers probed so far)
    alignment: list[dict[str, Any]] = field(default_factory=list)
    # degrees between each layer's error synapse E and its W at the first training step (after
    # the weight-mirror phase, rule.mirror_angle), and the mirror's time, summed over stages
    synapse_angle_at_start: dict[str, float] = field(default_factory=dict)
    mirror_seconds: float = 0.0

    def note_alignment(self, book: StatsBook, step: int, epoch: float) -> None:
        """Append the book's alignment at `step`; nothing while no stage reports any. Entries at
        or past `step` (the same step noted twice, or steps replayed after a recovery) go."""
        angles, cosines = book.alignment()
        if not angles and not cosines:
            return
        while self.alignment and self.alignment[-1]["step"] >= step:
            self.alignment.pop()
        self.alignment.append(
            {
                "step": step,
                "epoch": epoch,
                "synapse_angle_deg": angles,
                "backprop_cosine": cosines,
            }
        )

    def write(self, path: Location) -> None:
        """Publish the log at `path` (a local path or URI) whole: see driver/run/storage.py."""
        storage.write_bytes(path, json.dumps(self.__dict__, indent=1).encode())


@torch.no_grad()
def evaluate(runner: Runner, ds: Any, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the runner's eval-mode forward over `ds`."""
    correct, loss, n = 0, 0.0, 0
    for x, y in make_loader(ds, max(batch_size, 256), shuffle=False, seed=0):
        logits = runner.infer(x).float().cpu()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def evaluate_exits(runner: Runner, ds: Any, batch_size: int) -> tuple[float, float, list[float]]:
    """evaluate's (accuracy, mean cross-entropy) of the prediction, and the accuracy of every
    stage's early exit (runner.infer_exits) in the same pass: stage order, only stages with an
    exit; the last is the prediction's."""
    correct: list[int] = []
    loss, n = 0.0, 0
    for x, y in make_loader(ds, max(batch_size, 256), shuffle=False, seed=0):
        exits = [e.float().cpu() for e in runner.infer_exits(x) if e is not None]
        correct = correct or [0] * len(exits)
        if len(exits) != len(correct):
            raise RuntimeError(f"evaluate: {len(exits)} early exits, {len(correct)} before")
        for i, logits in enumerate(exits):
            correct[i] += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(exits[-1], y, reduction="sum"))
        n += len(y)
    accs = [c / max(n, 1) for c in correct]
    return (accs[-1] if accs else 0.0), loss / max(n, 1), accs


class Tally:
    """Train accuracy and loss from the logits of finished micro-batches."""

    def __init__(self) -> None:
        self.correct = self.seen = 0
        self.loss = 0.0

    def add(self, done: Completed) -> None:
        for logits, y in done:
            logits = logits.float().cpu()
            self.correct += int((logits.argmax(1) == y).sum())
            # per-sample losses in float64: the sum does not depend on how finished
            # micro-batches are grouped (a step's at once, or one by one)
            self.loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            self.seen += len(y)

    @property
    def acc(self) -> float:
        return self.correct / max(self.seen, 1)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.seen, 1)
