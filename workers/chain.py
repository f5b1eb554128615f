"""Stages of one model chained in this process: how a micro-batch goes up (forward) and its
learning signal comes down (learn), and the in-process runner built on that (K = 1, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch

from workers.rules import ErrorSignal, rule_chained, rule_decoupled
from workers.spec import StageSpec, StageStats
from workers.stage import Stage
from workers.state import merge_states


def stage_specs(base: StageSpec, bounds: list[int]) -> list[StageSpec]:
    """Specs for stages cut at `bounds` (block indices: [0, b1, ..., n_blocks]) of the model
    `base` owns whole (its blocks are (0, n_blocks))."""
    if base.blocks[0] != 0:
        raise ValueError(f"stage_specs: the base spec must own the whole model, not {base.blocks}")
    n = base.blocks[1]
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


def learns_chained(spec: StageSpec) -> bool:
    """Whether each stage learns from the signal of the stage right above it: the rule sends a
    boundary down, or diagnostics send backprop's gradient down. Otherwise every stage learns
    from the top stage's signal (the output error), all at once; or, decoupled, from its own
    head (diagnostics then probe the top stage alone: nothing goes down)."""
    if rule_decoupled(spec.rule):
        return False
    return rule_chained(spec.rule) or spec.diagnose_every > 0


def learns_decoupled(spec: StageSpec) -> bool:
    """Whether every stage learns from the labels alone, through an auxiliary head of its own,
    the moment its forward is done (rec-LRA's `decoupled` topology): no signal goes down."""
    return rule_decoupled(spec.rule)


def signal_source(stage: int, k: int, chained: bool) -> int:
    """The stage whose learn output stage `stage` (below the top, of `k`) learns from."""
    return stage + 1 if chained else k - 1


class Chainable(Protocol):
    """What a chain calls on a stage (a Stage, or a wrapper that times it)."""

    def forward(self, mb: Any, x: torch.Tensor) -> torch.Tensor: ...
    def learn(self, mb: Any, signal: ErrorSignal, *, apply: bool = False) -> ErrorSignal: ...


def forward_chain(stages: Sequence[Chainable], mb: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """Train-mode forward of micro-batch `mb` up the stages; every stage's output."""
    outs = []
    for stage in stages:
        x = stage.forward(mb, x)
        outs.append(x)
    return outs


def learn_chain(
    stages: Sequence[Chainable], mb: Any, labels: torch.Tensor, *, chained: bool
) -> list[ErrorSignal]:
    """Learn micro-batch `mb` down the stages: the top from the labels, each stage below from
    the signal its source sent (signal_source). Returns what each stage sent down."""
    k = len(stages)
    sent: dict[int, ErrorSignal] = {}
    for s in reversed(range(k)):
        signal = ErrorSignal(labels=labels) if s == k - 1 else sent[signal_source(s, k, chained)]
        sent[s] = stages[s].learn(mb, signal)
    return [sent[s] for s in range(k)]


def train_chain(
    stages: Sequence[Chainable],
    mb: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chained: bool,
    decoupled: bool = False,
) -> list[torch.Tensor]:
    """forward_chain then learn_chain of one micro-batch; every stage's output. `decoupled`:
    each stage forwards and learns in one op, from the labels, before the next one starts."""
    if decoupled:
        outs = []
        for stage in stages:
            x = stage.forward(mb, x)
            stage.learn(mb, ErrorSignal(labels=y))
            outs.append(x)
        return outs
    outs = forward_chain(stages, mb, x)
    learn_chain(stages, mb, y, chained=chained)
    return outs


class LocalRunner:
    """Runs training steps over in-process stages, in `sync` order: every micro-batch of a step
    sees the step's starting weights, and each stage applies once at the end of the step."""

    def __init__(self, specs: list[StageSpec]) -> None:
        self.stages = [Stage(s) for s in specs]
        self.chained = learns_chained(specs[0])
        self.decoupled = learns_decoupled(specs[0])

    def step(
        self, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One training step; returns [(logits, labels)] of its forward (for train accuracy)."""
        logits = []
        for mb, (xs, ys) in enumerate(
            zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)
        ):
            outs = train_chain(
                self.stages, mb, xs, ys, chained=self.chained, decoupled=self.decoupled
            )
            logits.append(outs[-1])
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

    @torch.no_grad()
    def infer_exits(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Eval-mode forward; every stage's early-exit logits, stage order (None: a stage with
        no exit). The last is the model's prediction, what infer returns."""
        exits = []
        for stage in self.stages:
            x, logits = stage.infer_exit(x)
            exits.append(logits)
        return exits

    def state_dict(self) -> dict:
        return merge_states([stage.state_dict() for stage in self.stages])

    def load_state_dict(self, state: dict) -> None:
        for stage in self.stages:
            stage.load_state_dict(state)
