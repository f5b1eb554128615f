"""The p2p engine's runner: K P2PStage actors that train a step per call and pass activations and
signals to each other by torch.distributed (driver/pipeline/p2p_stage.py).

The driver makes K calls per step (one `run_step` per stage, which also returns the stage's
stats) however many micro-batches the step has; the stream engine makes about 2K per
micro-batch. Both schedules run, with the stream engine's op order per stage and so its
numbers: `sync` (every learn of a step sees the step's starting weights and each stage applies
once at its end: one process's weights) and `async` (learns apply as they come and the stream
runs on across steps until flush()). A checkpoint cut (driver/pipeline/cut.py) goes with the
next calls; each stage takes its state at the cut's point of its own order and returns it with
the call that reached it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Any

import ray
import torch

from cluster.group import ActorGroup
from cluster.runtime import RaySession
from driver.config.pipeline import PipelineConfig
from driver.pipeline.batches import split
from driver.pipeline.p2p_stage import P2PStage
from driver.pipeline.plan import window
from driver.pipeline.stream import pipeline_specs
from workers.chain import learns_decoupled
from workers.spec import StageSpec, StageStats
from workers.state import merge_states

log = logging.getLogger(__name__)

Completed = list[tuple[torch.Tensor, torch.Tensor]]


def p2p_backend(cfg: PipelineConfig, cuda: bool) -> str:
    """The torch.distributed backend for `pipeline.transport`: nccl between GPUs, else gloo (the
    config already refused the object store for this engine). NCCL takes one rank per device,
    so stages sharing a GPU (gpus_per_stage below 1) send by gloo, through host memory."""
    shared = 0 <= cfg.gpus_per_stage < 1
    if cfg.transport == "nccl" and not cuda:
        raise ValueError('pipeline.transport: nccl needs train.device = "cuda"; use gloo')
    if cfg.transport == "nccl" and shared:
        raise ValueError(
            "pipeline.transport: nccl needs a whole GPU per stage (it refuses two ranks on one "
            'device); set pipeline.gpus_per_stage = 1, or transport = "gloo"'
        )
    if cfg.transport == "auto":
        return "nccl" if cuda and not shared else "gloo"
    return cfg.transport


class P2PCut:
    """The stages' checkpoint states at one stream position, as their calls bring them back
    (P2PPipeline.cut); `collect` once `complete`."""

    def __init__(self, k: int) -> None:
        self.states: list[dict[str, Any] | None] = [None] * k

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.states)

    def collect(self) -> list[dict[str, Any]]:
        """Each stage's state, stage 0 first."""
        assert self.complete, "cut collected before every stage sent its state"
        return list(self.states)  # type: ignore[arg-type]


class P2PPipeline:
    """A Runner (driver/pipeline/build.py) over K P2PStage actors."""

    def __init__(
        self,
        specs: list[StageSpec],
        cfg: PipelineConfig,
        *,
        fixed_size: bool | None = None,
        session: RaySession | None = None,
    ) -> None:
        cuda = specs[0].device.startswith("cuda")
        self.session = session  # the Ray closed after the stages (one the run started), if any
        self.transport = p2p_backend(cfg, cuda)
        self.cfg, self.k = cfg, len(specs)
        self.sync = cfg.schedule == "sync"
        self.decoupled = learns_decoupled(specs[0])  # every stage is given the labels
        gpus = cfg.gpus_per_stage if cfg.gpus_per_stage >= 0 else (1.0 if cuda else 0.0)
        threads = cfg.threads_per_stage or max(1, int(cfg.cpus_per_stage))
        specs = [  # gloo sends from host memory; nccl from the GPU
            replace(s, threads=threads, send_to_cpu=self.transport != "nccl")
            for s in pipeline_specs(specs, cfg)
        ]
        self.group = ActorGroup(
            P2PStage,
            [(s, self.k, window(cfg, self.k), self.sync) for s in specs],
            cpus=cfg.cpus_per_stage,
            gpus=gpus,
            strategy=cfg.strategy,
            placement_timeout_s=cfg.placement_timeout_s,
            timeout_key="pipeline.placement_timeout_s",
            fixed_size=fixed_size,
            role="stage",
        )
        self.actors = self.group.actors
        self._stats: list[tuple[int, StageStats]] = []
        self._labels: deque[torch.Tensor] = deque()  # fed, their logits not yet returned
        self._pending: deque[list[tuple[int, Any]]] = deque()  # submitted steps' calls
        self._fed = 0  # micro-batches fed to the open stream
        self._cut: P2PCut | None = None  # a checkpoint cut not complete yet
        self._cut_at: int | None = None  # its position, for the next calls to carry
        # a cut would miss learns summed but not applied unless applies divide a step (cut.py)
        self.cut_drains = not self.sync and cfg.micro_batches % (cfg.apply_every or 1) != 0
        try:
            self._join()
        except BaseException:
            self.group.shutdown()
            raise
        log.info("pipeline: p2p engine, stages exchange tensors by %s", self.transport)

    def _join(self) -> None:
        """Every actor built, then one process group of the K stages (stage 0 hosts it)."""
        start = self.cfg.placement_timeout_s
        key = "pipeline.placement_timeout_s"
        self.group.gather(
            [(i, a.ping.remote()) for i, a in enumerate(self.actors)],
            timeout_s=start,
            key=key,
            what="start",
        )
        host, port = self.group.gather(
            [(0, self.actors[0].rendezvous_address.remote())], timeout_s=start, key=key
        )[0]
        joins = [
            (i, a.join.remote(host, port, self.transport, self.cfg.step_timeout_s))
            for i, a in enumerate(self.actors)
        ]
        self.group.gather(joins, timeout_s=start, key=key, what="join the process group")

    def _gather(self, refs: list[tuple[int, Any]], what: str) -> list[Any]:
        return self.group.gather(
            refs, timeout_s=self.cfg.step_timeout_s, key="pipeline.step_timeout_s", what=what
        )

    @property
    def cut_pending(self) -> bool:
        return self._cut is not None

    def cut(self) -> P2PCut:
        """Every stage's state at the stream's current position, taken without draining it: the
        next calls carry the position, and each stage takes its state at that point of its own
        op order (driver/pipeline/cut.py says which); it is complete once all have come back.
        An empty stream (sync, or after a flush) is taken at once."""
        if self._cut is not None:
            raise RuntimeError("a checkpoint cut is still being taken; flush() completes it")
        cut = P2PCut(self.k)
        if self._fed == 0:
            refs = [(s, a.state_dict.remote()) for s, a in enumerate(self.actors)]
            cut.states = self._gather(refs, "state_dict")
        else:
            self._cut, self._cut_at = cut, self._fed
        return cut

    def step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> Completed:
        """One training step: K calls, each running what the step lets its stage run. `sync`
        returns the step's logits once it is applied. `async` submits the step's calls behind
        the previous step's (an actor runs its calls in order, so a stage starts this step as
        soon as it ends the last: no barrier between steps) and returns the previous step's
        logits once its calls end; flush() drains the rest."""
        xs, ys = split(x, y, micro_batches)
        self._labels.extend(ys)
        self._pending.append(self._submit(xs, ys, [len(c) for c in ys], close=self.sync))
        return self._finish(keep=0 if self.sync else 1)

    def flush(self) -> Completed:
        """Close the stream (async: finish every micro-batch fed and apply what is pending)."""
        if self.sync:
            return []  # every step is complete when it returns
        self._pending.append(self._submit(None, None, [], close=True))
        return self._finish(keep=0)

    def _submit(
        self,
        xs: list[torch.Tensor] | None,
        ys: list[torch.Tensor] | None,
        sizes: list[int],
        *,
        close: bool,
    ) -> list[tuple[int, Any]]:
        top, cut = self.k - 1, self._cut_at
        self._cut_at = None  # armed in this call
        self._fed = 0 if close else self._fed + len(sizes)
        try:
            return [
                (
                    s,
                    a.run_step.remote(
                        xs if s == 0 else None,
                        ys if (s == top or self.decoupled) else None,
                        sizes,
                        close,
                        cut,
                    ),
                )
                for s, a in enumerate(self.actors)
            ]
        except BaseException:
            self.close()
            raise

    def _finish(self, *, keep: int) -> Completed:
        """Wait for the submitted calls but the last `keep` steps'; their top's logits."""
        out: Completed = []
        while len(self._pending) > keep:
            try:
                results = self._gather(self._pending.popleft(), "step")
            except BaseException:
                self.close()
                raise
            self._stats += [(s, stats) for s, (_, stats, _) in enumerate(results)]
            self._take_cut([state for _, _, state in results])
            logits = results[-1][0]
            if logits:
                labels = [self._labels.popleft() for _ in logits]
                out.append((torch.cat(logits), torch.cat(labels)))
        return out

    def _take_cut(self, states: list[dict[str, Any] | None]) -> None:
        for s, state in enumerate(states):
            if state is not None:
                assert self._cut is not None, "a stage took a cut nobody asked for"
                self._cut.states[s] = state
        if self._cut is not None and self._cut.complete:
            self._cut = None

    def drain_stats(self, *, wait: bool = False) -> list[tuple[int, StageStats]]:
        taken, self._stats = self._stats, []
        return taken

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        ref: Any = x
        for a in self.actors:
            ref = a.infer.remote(ref)
        return self._gather([(self.k - 1, ref)], "infer")[0]

    def infer_exits(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Eval-mode forward; every stage's early-exit logits, stage order (None: a stage with
        no exit), the last the model's prediction. Outputs go actor to actor as in infer."""
        ref: Any = x
        exits: list[tuple[int, Any]] = []
        for s, a in enumerate(self.actors):
            ref, logits = a.infer_exit.options(num_returns=2).remote(ref)
            exits.append((s, logits))
        return self._gather(exits, "infer")

    def state_dict(self) -> dict[str, Any]:
        refs = [(s, a.state_dict.remote()) for s, a in enumerate(self.actors)]
        return merge_states(self._gather(refs, "state_dict"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ref = ray.put(state)
        self._gather(
            [(s, a.load_state_dict.remote(ref)) for s, a in enumerate(self.actors)],
            "load_state_dict",
        )

    def close(self) -> None:
        try:
            self.group.shutdown()
        finally:
            if self.session is not None:
                self.session.close()
