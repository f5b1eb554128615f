"""bench.chaos's plan (the run; which fault, where, when: seeded), what it watches of the run
(a callback and a log handler) and its report (the weights compared, the table)."""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from driver.config import Config, load_config
from driver.run.callbacks import Callback

KINDS = ("kill",) * 5 + ("stop", "enospc")
ENOSPC_TEXT = ("no space left", "enospc", "errno 28")
BOUNDS = {2: "[2]", 3: "[1, 3]"}


def chaos_config(
    stages: int, epochs: int, every: int, timeout_s: float, transport: str = "object_store"
) -> Config:
    """A tiny digits run (ResNet width 4, float64, sync) whose weights compare bitwise. The
    object store carries activations by default: a gloo group is made under the same
    pipeline.step_timeout_s, which a few seconds (as the SIGSTOP needs) do not cover on a busy
    2-core machine, so every start would wait the deadline out before falling back."""
    return load_config(
        None,
        [
            "model.width=4",
            f"train.epochs={epochs}",
            "train.batch_size=64",
            "train.compare=[]",
            'train.dtype="float64"',
            "train.log_every=100000",
            f"train.checkpoint_every={every}",
            "train.max_restarts=50",
            'rule.topology="mirror"',  # chained: K stages end with one process's weights
            f"pipeline.stages={stages}",
            f"pipeline.boundaries={BOUNDS[stages]}",
            "pipeline.micro_batches=2",
            'pipeline.schedule="sync"',
            f"pipeline.step_timeout_s={timeout_s}",
            f'pipeline.transport="{transport}"',
        ],
    )


@dataclass
class Fault:
    kind: str  # kill | stop | enospc
    stage: int  # the stage signalled (-1: the checkpoint location)
    at_step: int  # injected once the run has trained this many steps
    step: int = -1  # steps trained when injected (enospc: when the write failed)
    restored_to: int = -1  # the checkpoint step the run went back to (-1: none)
    steps_replayed: int = 0
    restarts: int = 0  # the run's restarts until it recovered (more than 1: a start timed out)
    recovered: bool = False
    seconds: float | None = None
    note: str = ""


def make_plan(seed: int, stages: int, total: int, gap: int, kinds=KINDS) -> list[Fault]:
    """The faults in a seeded random order, at random steps at least `gap` apart, on random
    stages, all within (2, total - gap)."""
    rng = random.Random(seed)
    n = len(kinds)
    room = total - gap - 3 - gap * (n - 1)
    if room < n:
        raise ValueError(f"{total} steps cannot hold {n} faults {gap} steps apart; add epochs")
    steps = [s + 3 + gap * i for i, s in enumerate(sorted(rng.sample(range(room), n)))]
    order = rng.sample(list(kinds), n)
    return [
        Fault(k, -1 if k == "enospc" else rng.randrange(stages), s)
        for k, s in zip(order, steps, strict=True)
    ]


class Watch(Callback, logging.Handler):
    """What the driving thread reports: the step each restart went back to, checkpoints
    written, and checkpoint writes that failed for lack of space (from the log)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.WARNING)
        self.restored: list[int] = []
        self.written: list[tuple[float, int]] = []
        self.enospc: list[tuple[float, int, str]] = []  # (when, steps trained, message)
        self.ctl: Any = None

    def on_restart(self, ctl: Any) -> None:
        self.restored.append(ctl.run.steps)

    def after_checkpoint(self, ctl: Any, path: Path | str) -> None:
        step = re.search(r"ckpt-(\d+)", str(path))
        self.written.append((time.perf_counter(), int(step.group(1)) if step else -1))

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        exc = str(record.exc_info[1]) if record.exc_info else ""
        text += f" ({exc})" if exc and exc not in text else ""
        if any(t in text.lower() for t in ENOSPC_TEXT):
            step = re.search(r"step (\d+)", text)  # the failed checkpoint's, else the run's
            steps = int(step.group(1)) if step else self.ctl.run.steps if self.ctl else -1
            self.enospc.append((time.perf_counter(), steps, text.splitlines()[0][:300]))


def compare_states(a: Any, b: Any) -> tuple[bool, float]:
    """(bitwise equal, max abs difference of the tensors) of two nested states."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False, float("inf")
        same = torch.equal(a, b)
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        return same, float(diff)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False, float("inf")
        pairs = [compare_states(a[k], b[k]) for k in a]
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        pairs = [compare_states(x, y) for x, y in zip(a, b, strict=True)]
    else:
        return a == b, 0.0
    return all(p[0] for p in pairs), max((p[1] for p in pairs), default=0.0)


def table(result: dict[str, Any]) -> str:
    rows = [
        "| # | fault | stage | step | back to | replayed | restarts | recovered | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(result["faults"], 1):
        sec = f"{f['seconds']:.2f}" if f["seconds"] is not None else "-"
        rows.append(
            f"| {i} | {f['kind']} | {f['stage'] if f['stage'] >= 0 else 'ckpt'} | {f['step']} | "
            f"{f['restored_to'] if f['restored_to'] >= 0 else '-'} | {f['steps_replayed']} | "
            f"{f['restarts']} | "
            f"{'yes' if f['recovered'] else 'NO'} | {sec} |"
        )
    r = result
    med = r["recovery_seconds_median"]
    rows.append(
        f"\nfaults survived {r['faults_survived']}/{r['faults_injected']}, steps lost "
        f"{r['steps_lost']} ({r['final_steps']}/{r['expected_steps']}, {r['final_state']}), "
        f"replayed {r['steps_replayed']}, recovery median "
        f"{med if med is None else round(med, 2)} s max "
        f"{r['recovery_seconds_max'] if med is None else round(r['recovery_seconds_max'], 2)} s, "
        f"weights equal {r['weights_equal']} (max abs diff {r['max_abs_diff']:.3g}), "
        f"wall {r['wall_seconds']:.0f} s"
    )
    return "\n".join(rows)
