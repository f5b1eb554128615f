"""The pipeline: K stages fed a stream of micro-batches, on Ray actors (activations and errors
pass actor to actor as refs) or in this process, with the same ops in the same order."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from cluster.runtime import RaySession
from driver.config.pipeline import PipelineConfig
from driver.pipeline.batches import split
from driver.pipeline.cut import Cut
from driver.pipeline.plan import window
from driver.pipeline.schedule import APPLY, FORWARD, LEARN, Op, Stream
from driver.pipeline.stages import LocalStages, RayStages, Stages
from workers.chain import learns_chained, learns_decoupled, signal_source
from workers.rules import ErrorSignal
from workers.spec import StageSpec, StageStats
from workers.state import merge_states

log = logging.getLogger(__name__)

Completed = list[tuple[torch.Tensor, torch.Tensor]]  # (logits, labels) of finished micro-batches


def pipeline_specs(specs: list[StageSpec], cfg: PipelineConfig) -> list[StageSpec]:
    """The stages' specs as the pipeline runs them: the cache bound of the window, and how
    often and over how much of a step each optimizer step goes (async)."""
    every = cfg.apply_every or cfg.micro_batches
    return [
        replace(
            s,
            max_cached=window(cfg, len(specs)) + 1,
            apply_every=every if cfg.schedule == "async" else 1,
            learn_fraction=1.0 / cfg.micro_batches,
        )
        for s in specs
    ]


class StreamPipeline:
    """K stages trained by a stream of micro-batches (see driver/pipeline/schedule.py).

    `sync`: a step's micro-batches are learned with the step's starting weights and each stage
    applies once at the end, so K stages give the same weights as one process. `async`: learns
    apply as they come (every `pipeline.apply_every` of them) and the stream flows on across
    steps until flush(). The stages are a LocalStages (this process, in submission order: the
    same ops, in the same order per stage, as on Ray, hence the same numbers) or RayStages.
    """

    def __init__(
        self, stages: Stages, cfg: PipelineConfig, *, chained: bool, decoupled: bool = False
    ) -> None:
        self.cfg, self.stages = cfg, stages
        self.k = len(stages)
        self.window = window(cfg, self.k)
        self.sync = cfg.schedule == "sync"
        self.chained = chained
        # every stage forwards and learns a micro-batch in one call, from its own head
        self.decoupled = decoupled
        try:  # constructors run remotely: surface their errors here, with a deadline
            stages.ready()
        except BaseException:
            stages.shutdown()
            raise
        self._labels: dict[int, torch.Tensor] = {}
        self._stats: list[tuple[int, Any]] = []
        self._cut: Cut | None = None  # a checkpoint cut whose calls are not all submitted yet
        # a cut would miss learns summed but not applied unless applies divide a step (cut.py)
        self.cut_drains = not self.sync and cfg.micro_batches % (cfg.apply_every or 1) != 0
        self._reset_stream()

    # -- the stream ---------------------------------------------------------------------------
    def _reset_stream(self) -> None:
        self.stream = Stream(
            self.k, self.window, chained=self.chained, sync=self.sync, decoupled=self.decoupled
        )
        self._refs: dict[Op, Any] = {}
        self._data: dict[int, tuple[Any, torch.Tensor]] = {}
        self._outputs: list[tuple[int, Any]] = []  # (mb, logits) not yet returned
        self._learned: list[tuple[int, list[tuple[int, Any]]]] = []
        self._fused: dict[Op, Any] = {}  # learns run by forward_learn calls

    def _gather(self, refs: list[tuple[int, Any]], what: str) -> list[Any]:
        return self.stages.gather(refs, what, self.cfg.step_timeout_s)

    def _submit_ready(self) -> None:
        for op in self.stream.ready():
            if self._cut is not None:
                self._cut.before(op)
            self._refs[op] = self._submit(op)
            if self._cut is not None:
                self._cut.after(op)
                self._cut = None if self._cut.complete else self._cut
            if op.kind == LEARN and all(Op(LEARN, s, op.mb) in self._refs for s in range(self.k)):
                self._retire(op.mb)

    def _submit(self, op: Op) -> Any:
        """Call `op` on its stage with its arguments: futures of the ops it depends on. This is
        workers.chain's forward and learn chain taken apart into ops, so that stages overlap:
        the top learns from the labels, a stage below from its signal_source's learn."""
        s, m, st = op.stage, op.mb, self.stages
        if op.kind == APPLY:
            return st.apply(s)
        top = s == self.k - 1
        if op.kind == FORWARD:
            x = self._data[m][0] if s == 0 else self._refs[Op(FORWARD, s - 1, m)]
            if not (top or self.decoupled):
                return st.forward(s, m, x)
            # the last stage (and a decoupled one) learns right after its forward from the
            # labels (window 1): one call for both
            labels = ErrorSignal(labels=self._data[m][1])
            out, self._fused[Op(LEARN, s, m)] = st.forward_learn(
                s, m, x, labels, apply=not self.sync
            )
            if top:
                self._outputs.append((m, out))
            return out
        if top or self.decoupled:
            return self._fused.pop(op)
        signal = self._refs[Op(LEARN, signal_source(s, self.k, self.chained), m)]
        return st.learn(s, m, signal, apply=not self.sync, direct=self._relayed(s))

    def _relayed(self, s: int) -> bool:
        """Whether stage s's learn result is a boundary that only the stage below takes (a
        chained stage between the bottom and the top): it goes by the direct transport, and
        the driver never waits on it. A failure there reaches the driver through the stage
        below's learn, which takes it as its argument (Ray fails a call whose argument failed)."""
        return self.chained and 0 < s < self.k - 1

    def _awaited(self, s: int) -> bool:
        """Whether the driver waits on stage s's learn result: not on a relayed one, nor on the
        top's (its call's logits are gathered, and every learn below takes its signal), so the
        driver never receives a boundary or e_L it does not use."""
        return self.k == 1 or not (self._relayed(s) or s == self.k - 1)

    def _retire(self, mb: int) -> None:
        """Every op of `mb` is submitted: keep only its learn refs (to wait on), drop the rest."""
        refs = [(s, self._refs.pop(Op(LEARN, s, mb))) for s in range(self.k)]
        learned = [(s, ref) for s, ref in refs if self._awaited(s)]
        for s in range(self.k):
            self._refs.pop(Op(FORWARD, s, mb), None)
        self._learned.append((mb, learned))
        self._data.pop(mb, None)
        self.stream.forget(mb)

    def _collect(self, *, wait: bool) -> Completed:
        """Logits of finished micro-batches (all of them when `wait`)."""
        if not self._outputs:
            return []
        refs = [(self.k - 1, r) for _, r in self._outputs]
        if not wait:
            refs = refs[: self.stages.finished([r for _, r in refs])]
        logits = self._gather(refs, "forward")
        labels = [self._labels.pop(m) for m, _ in self._outputs[: len(refs)]]
        del self._outputs[: len(refs)]
        return list(zip(logits, labels, strict=True))

    def _pop_stats(self) -> None:
        self._stats += [(s, self.stages.pop_stats(s)) for s in range(self.k)]

    # -- the runner interface -----------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> Completed:
        """Feed one step's batch. `sync` returns when the step is applied; `async` returns at
        once with whatever micro-batches have finished (flush() drains the rest)."""
        try:
            return self._step(x, y, micro_batches)
        except BaseException:
            self.close()
            raise

    def _step(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> Completed:
        for xs, ys in zip(*split(x, y, micro_batches), strict=True):
            m = self.stream.available
            self._data[m] = (xs, ys)  # an argument: Ray inlines it (small) or stores it (large)
            self._labels[m] = ys
            self.stream.available += 1
        if self.sync:
            out = self._drain()
            self._pop_stats()
            return out
        self._submit_ready()
        self._pop_stats()
        backlog = len(self._learned) - 2 * (self.window + self.k)
        if backlog > 0:  # bound what the stream holds: wait for the oldest micro-batches
            old = self._learned[:backlog]
            del self._learned[:backlog]
            self._gather([r for _, refs in old for r in refs], "learn")
        return self._collect(wait=False)

    def flush(self) -> Completed:
        """Finish every micro-batch fed so far (async: and apply what is still accumulated);
        the next step starts a new stream."""
        try:
            out = self._drain()
            if not self.sync:
                pending = [(s, self.stages.apply_pending(s)) for s in range(self.k)]
                self._gather(pending, "apply")
        except BaseException:
            self.close()
            raise
        self._pop_stats()
        return out

    def _drain(self) -> Completed:
        self.stream.closed = True
        self._submit_ready()
        assert self.stream.finished() and self._cut is None, "schedule did not drain"
        waits = [r for _, refs in self._learned for r in refs]
        waits += [(op.stage, ref) for op, ref in self._refs.items() if op.kind == APPLY]
        self._gather(waits, "learn")
        out = self._collect(wait=True)
        self._reset_stream()
        return out

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        ref: Any = x
        for s in range(self.k):
            ref = self.stages.infer(s, ref)
        return self._gather([(self.k - 1, ref)], "infer")[0]

    def infer_exits(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Eval-mode forward; every stage's early-exit logits, stage order (None: a stage with
        no exit), the last the model's prediction. Outputs go stage to stage as in infer."""
        ref: Any = x
        exits: list[tuple[int, Any]] = []
        for s in range(self.k):
            ref, logits = self.stages.infer_exit(s, ref)
            exits.append((s, logits))
        return self._gather(exits, "infer")

    def drain_stats(self, *, wait: bool = False) -> list[tuple[int, StageStats]]:
        """(stage, stats) reported since the last call: one per stage per step, in order."""
        if not self._stats:
            return []
        n = len(self._stats)
        if not wait:
            n = self.stages.finished([r for _, r in self._stats])
        taken, self._stats = self._stats[:n], self._stats[n:]
        return list(zip([s for s, _ in taken], self._gather(taken, "stats"), strict=True))

    def cut(self) -> Cut:
        """Every stage's state at the stream's current position, taken without draining it
        (driver/pipeline/cut.py); it completes as the stream flows on (`cut_pending`)."""
        if self._cut is not None:
            raise RuntimeError("a checkpoint cut is still being taken; flush() completes it")
        cut = Cut(self.stream.available, self.stream.seqs, self.stages, self.cfg.step_timeout_s)
        self._cut = None if cut.complete else cut
        return cut

    @property
    def cut_pending(self) -> bool:
        return self._cut is not None

    def state_dict(self) -> dict[str, Any]:
        states = self._gather([(s, self.stages.state_dict(s)) for s in range(self.k)], "state_dict")
        return merge_states(states)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ref = self.stages.put(state)
        self._gather(
            [(s, self.stages.load_state_dict(s, ref)) for s in range(self.k)], "load_state_dict"
        )

    def close(self) -> None:
        self.stages.shutdown()


class RayPipeline(StreamPipeline):
    """K Stage actors, one per placement-group bundle, passing activations and errors actor to
    actor as object references."""

    def __init__(
        self,
        specs: list[StageSpec],
        cfg: PipelineConfig,
        *,
        fixed_size: bool | None = None,
        session: RaySession | None = None,
    ) -> None:
        """`fixed_size`: True when the cluster cannot grow (a local Ray the run started), so a
        placement that can never fit fails at once; None asks the cluster. `session`: the Ray
        this pipeline closes after its stages (one it started), if any."""
        self.session = session
        chained, decoupled = learns_chained(specs[0]), learns_decoupled(specs[0])
        cuda = specs[0].device.startswith("cuda")
        gpus = cfg.gpus_per_stage if cfg.gpus_per_stage >= 0 else (1.0 if cuda else 0.0)
        threads = cfg.threads_per_stage or max(1, int(cfg.cpus_per_stage))
        transport = cfg.transport
        if transport == "auto":  # the fastest measured (bench.transport): 1 MB in 1.2 ms, not 4.4
            transport = "nccl" if cuda else "gloo"
        if transport == "nccl" and not cuda:
            raise ValueError('pipeline.transport: nccl needs train.device = "cuda"; use gloo')
        specs = [
            replace(
                s,
                threads=threads,
                send_to_cpu=transport in ("object_store", "gloo"),  # nccl: stay on the GPU
                device="cuda" if cuda else s.device,
            )
            for s in pipeline_specs(specs, cfg)
        ]
        stages = RayStages(
            specs,
            cpus=cfg.cpus_per_stage,
            gpus=gpus,
            strategy=cfg.strategy,
            placement_timeout_s=cfg.placement_timeout_s,
            step_timeout_s=cfg.step_timeout_s,
            fixed_size=fixed_size,
            transport=transport,
        )
        super().__init__(stages, cfg, chained=chained, decoupled=decoupled)
        self.transport = stages.transport
        log.info("pipeline: activations go stage to stage by %s", self.transport)
        self.group = stages.group  # recovery and tests reach the actors through it

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.session is not None:
                self.session.close()


class LocalPipeline(StreamPipeline):
    """The same stream in this process: K stages called in submission order (no Ray)."""

    def __init__(self, specs: list[StageSpec], cfg: PipelineConfig) -> None:
        super().__init__(
            LocalStages(pipeline_specs(specs, cfg)),
            cfg,
            chained=learns_chained(specs[0]),
            decoupled=learns_decoupled(specs[0]),
        )
