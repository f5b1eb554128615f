"""Typed handles on K stages: one interface (StageHandles), two implementations: stages as
objects in this process (LocalStages, the test double) or as Ray actors (RayStages). A call
returns a future (the value itself in process, an ObjectRef on Ray); `gather` turns futures
into values, with a deadline on Ray."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import ray

from cluster.group import ActorGroup
from workers.rules import ErrorSignal
from workers.spec import StageSpec
from workers.stage import Stage

log = logging.getLogger(__name__)

Future = Any  # a value (LocalStages) or a ray.ObjectRef (RayStages)


class StageHandles(ABC):
    """What the stream engine calls on its K stages, by stage index. Every method is a typed
    call on the stage's own method of the same name (workers/stage.py), never a name string."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def forward(self, i: int, mb: int, x: Future) -> Future:
        """Stage i's train-mode forward of micro-batch mb; its activation."""

    @abstractmethod
    def forward_learn(
        self, i: int, mb: int, x: Future, signal: ErrorSignal, *, apply: bool
    ) -> tuple[Future, Future]:
        """The top stage's forward and learn in one call: (logits, the signal it sends)."""

    @abstractmethod
    def learn(
        self, i: int, mb: int, signal: Future, *, apply: bool, direct: bool = False
    ) -> Future:
        """Stage i learns mb from `signal`; the signal it sends down. `direct`: only the stage
        below takes the result (Ray may send it by the direct transport)."""

    @abstractmethod
    def apply(self, i: int) -> Future: ...

    @abstractmethod
    def apply_pending(self, i: int) -> Future: ...

    @abstractmethod
    def infer(self, i: int, x: Future) -> Future: ...

    @abstractmethod
    def infer_exit(self, i: int, x: Future) -> tuple[Future, Future]:
        """Stage i's eval-mode forward: (its output, for stage i + 1; its early-exit logits,
        None for a stage with no exit)."""

    @abstractmethod
    def pop_stats(self, i: int) -> Future: ...

    @abstractmethod
    def mark(self, i: int) -> Future: ...

    @abstractmethod
    def state_dict(self, i: int, *, marked: bool = False) -> Future: ...

    @abstractmethod
    def load_state_dict(self, i: int, state: Any) -> Future: ...

    @abstractmethod
    def put(self, value: Any) -> Any:
        """A value every stage may take as an argument (an object ref on Ray)."""

    @abstractmethod
    def ready(self) -> None:
        """Return once every stage is built; a constructor's error surfaces here."""

    @abstractmethod
    def gather(
        self, futures: Sequence[tuple[int, Future]], what: str, timeout_s: float
    ) -> list[Any]:
        """The futures' values, in order, within `timeout_s`; an error names its stage."""

    @abstractmethod
    def finished(self, futures: Sequence[Future]) -> int:
        """How many of `futures`, from the first, have their values."""

    @abstractmethod
    def shutdown(self) -> None: ...


class LocalStages(StageHandles):
    """Stages in this process: every call runs at once, in submission order."""

    def __init__(self, specs: Sequence[StageSpec]) -> None:
        self.stages = [Stage(s) for s in specs]

    def __len__(self) -> int:
        return len(self.stages)

    def forward(self, i: int, mb: int, x: Future) -> Future:
        return self.stages[i].forward(mb, x)

    def forward_learn(
        self, i: int, mb: int, x: Future, signal: ErrorSignal, *, apply: bool
    ) -> tuple[Future, Future]:
        return self.stages[i].forward_learn(mb, x, signal, apply=apply)

    def learn(
        self, i: int, mb: int, signal: Future, *, apply: bool, direct: bool = False
    ) -> Future:
        return self.stages[i].learn(mb, signal, apply=apply)

    def apply(self, i: int) -> Future:
        return self.stages[i].apply()

    def apply_pending(self, i: int) -> Future:
        return self.stages[i].apply_pending()

    def infer(self, i: int, x: Future) -> Future:
        return self.stages[i].infer(x)

    def infer_exit(self, i: int, x: Future) -> tuple[Future, Future]:
        return self.stages[i].infer_exit(x)

    def pop_stats(self, i: int) -> Future:
        return self.stages[i].pop_stats()

    def mark(self, i: int) -> Future:
        return self.stages[i].mark()

    def state_dict(self, i: int, *, marked: bool = False) -> Future:
        return self.stages[i].state_dict(marked=marked)

    def load_state_dict(self, i: int, state: Any) -> Future:
        return self.stages[i].load_state_dict(state)

    def put(self, value: Any) -> Any:
        return value

    def ready(self) -> None:
        """Every stage was built (in process: by the constructor)."""

    def gather(
        self, futures: Sequence[tuple[int, Future]], what: str, timeout_s: float
    ) -> list[Any]:
        return [f for _, f in futures]

    def finished(self, futures: Sequence[Future]) -> int:
        """How many of `futures`, from the first, have their values."""
        return len(futures)

    def shutdown(self) -> None:
        for stage in self.stages:
            stage.drop_cache()


class RayStages(StageHandles):
    """One Stage actor per placement-group bundle (cluster.group.ActorGroup); calls are typed
    method calls on the actors, and `gather` waits with the pipeline's step deadline."""

    def __init__(
        self,
        specs: Sequence[StageSpec],
        *,
        cpus: float,
        gpus: float,
        strategy: str,
        placement_timeout_s: float,
        step_timeout_s: float,
        fixed_size: bool | None = None,
        transport: str = "object_store",
    ) -> None:
        """`transport`: how activations go from stage to stage: "object_store" (Ray's shared
        memory), or a Ray Direct Transport ("gloo" on CPU, "nccl" between GPUs), which falls
        back to the object store, saying why, when its collective group cannot be made."""
        direct = transport != "object_store"
        self.group = ActorGroup(
            Stage,
            [(s,) for s in specs],
            cpus=cpus,
            gpus=gpus,
            strategy=strategy,
            placement_timeout_s=placement_timeout_s,
            timeout_key="pipeline.placement_timeout_s",
            fixed_size=fixed_size,
            role="stage",
            actor_options={"enable_tensor_transport": True} if direct else None,
        )
        self.actors = self.group.actors
        self.step_timeout_s = step_timeout_s
        self.start_timeout_s = placement_timeout_s  # start-up is placement's, not a step's
        self.transport = transport
        if direct:
            why = self.group.collective(transport, placement_timeout_s)
            if why:
                log.warning(
                    "pipeline: %s transport unavailable (%s); using the object store",
                    transport,
                    why,
                )
                self.transport = "object_store"

    def __len__(self) -> int:
        return len(self.actors)

    def _direct(self, method: Any) -> Any:
        """`method` sending its result by the direct transport (gloo, nccl): only for results
        another stage takes as an argument; the driver cannot receive them (two-sided
        transports need both ends in the collective group), so it never gathers one."""
        if self.transport == "object_store":
            return method
        return method.options(tensor_transport=self.transport)

    def forward(self, i: int, mb: int, x: Future) -> Future:
        """Stage i's forward, its activation for stage i + 1 (the top stage's forward_learn
        returns two results, logits for the driver, so it stays on the object store)."""
        return self._direct(self.actors[i].forward).remote(mb, x)

    def forward_learn(
        self, i: int, mb: int, x: Future, signal: ErrorSignal, *, apply: bool
    ) -> tuple[Future, Future]:
        return (
            self.actors[i].forward_learn.options(num_returns=2).remote(mb, x, signal, apply=apply)
        )

    def learn(
        self, i: int, mb: int, signal: Future, *, apply: bool, direct: bool = False
    ) -> Future:
        """`direct`: the result is a boundary only the stage below takes (never gathered)."""
        method = self.actors[i].learn
        return (self._direct(method) if direct else method).remote(mb, signal, apply=apply)

    def apply(self, i: int) -> Future:
        return self.actors[i].apply.remote()

    def apply_pending(self, i: int) -> Future:
        return self.actors[i].apply_pending.remote()

    def infer(self, i: int, x: Future) -> Future:
        return self.actors[i].infer.remote(x)

    def infer_exit(self, i: int, x: Future) -> tuple[Future, Future]:
        """Two results on the object store: the output the next stage takes, and the logits
        the driver gathers."""
        return self.actors[i].infer_exit.options(num_returns=2).remote(x)

    def pop_stats(self, i: int) -> Future:
        return self.actors[i].pop_stats.remote()

    def mark(self, i: int) -> Future:
        return self.actors[i].mark.remote()

    def state_dict(self, i: int, *, marked: bool = False) -> Future:
        return self.actors[i].state_dict.remote(marked=marked)

    def load_state_dict(self, i: int, state: Any) -> Future:
        return self.actors[i].load_state_dict.remote(state)

    def put(self, value: Any) -> Any:
        return ray.put(value)

    def ready(self) -> None:
        """Wait until every actor's constructor ran: its errors surface here, with the start
        deadline (pipeline.placement_timeout_s: a step deadline short enough to catch a hung
        stage quickly must not also bound actor start-up)."""
        pings = [(i, a.ping.remote()) for i, a in enumerate(self.actors)]
        self.group.gather(
            pings, timeout_s=self.start_timeout_s, key="pipeline.placement_timeout_s", what="start"
        )

    def gather(
        self, futures: Sequence[tuple[int, Future]], what: str, timeout_s: float
    ) -> list[Any]:
        return self.group.gather(
            futures, timeout_s=timeout_s, key="pipeline.step_timeout_s", what=what
        )

    def finished(self, futures: Sequence[Future]) -> int:
        if not futures:
            return 0
        done = set(ray.wait(list(futures), num_returns=len(futures), timeout=0)[0])
        return next((i for i, f in enumerate(futures) if f not in done), len(futures))

    def shutdown(self) -> None:
        self.group.shutdown()


Stages = StageHandles  # the name the stream engine uses
