"""train.compile: a stage's forward maps under torch.compile, and its failures in one line.

What is compiled is the training forward of each stage's trunk, one function per stage:
`Block.forward_local` for the target rules (rec-LRA, LRA-E, DFA) and the differentiable
`Block.forward` for the autograd rules (backprop; FA, KP and sign through their own
autograd.Function, which dynamo traces with its backward). The target sweep is not compiled: it
is a loop of explicit backward kernels (a conv's backward, BatchNorm's backward) that already run
as single library calls, and it writes .grad of parameters as it goes. Evaluation and the
auxiliary heads of decoupled stages run eagerly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch

from workers.blocks import Block, BlockCache
from workers.rules import Rule
from workers.spec import StageSpec


class CompileError(RuntimeError):
    """torch.compile could not compile a stage's forward: one line, naming the block and fix."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    """The exception types torch.compile raises for a graph it cannot compile."""
    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    inductor = getattr(torch._inductor.exc, "InductorError", None)  # torch >= 2.7
    if isinstance(inductor, type) and issubclass(inductor, BaseException):
        errors.append(inductor)
    return tuple(errors)


def check_compiler(device: str) -> None:
    """Inductor builds CPU kernels with a C++ compiler; refuse up front without one."""
    if torch.device(device).type != "cpu":
        return
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise CompileError(
            "train.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH, "
            "and none was found; install one or set train.compile = false"
        )


class CompiledForward:
    """The stage's trunk forward as one compiled function (one graph, or a few where dynamo
    breaks it), compiled on its first call. One function per stage: dynamo keeps its compiled
    graphs per code object, and blocks compiled one by one would share one code object (every
    block's forward_local) and soon pass its recompile limit, falling back to eager."""

    def __init__(self, trunk: list[Block], rule: Rule, stage: int) -> None:
        self.stage = stage
        self._errors = _compile_errors()
        if rule.autograd:
            layer_map = rule.layer_map  # type: ignore[attr-defined]

            def forward(x: torch.Tensor) -> torch.Tensor:
                for block in trunk:
                    x = block(x, layer_map)
                return x

            self._map: Callable[..., Any] = torch.compile(forward)
        else:

            def forward_local(x: torch.Tensor) -> tuple[torch.Tensor, list[BlockCache]]:
                caches = []
                for block in trunk:
                    x, cache = block.forward_local(x)
                    caches.append(cache)
                return x, caches

            self._map = torch.compile(forward_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's differentiable forward (autograd rules)."""
        return self._call(x)

    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, list[BlockCache]]:
        """The trunk's forward_local: its output and each block's cache (target rules)."""
        return self._call(x)

    def _call(self, x: torch.Tensor) -> Any:
        try:
            return self._map(x)
        except self._errors as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CompileError(
                f"stage {self.stage}: train.compile: torch.compile failed on the stage's "
                f"forward ({type(exc).__name__}: {first}); set train.compile = false"
            ) from None


def compile_stage(trunk: list[Block], rule: Rule, spec: StageSpec) -> CompiledForward:
    """train.compile for a stage: its trunk's forward maps, compiled lazily (first call)."""
    check_compiler(spec.device)
    return CompiledForward(trunk, rule, spec.index)
