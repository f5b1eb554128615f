"""A checkpoint cut: every stage's state at one point of the stream, taken as the stream flows.

A cut at stream position n (the micro-batches fed so far) asks each stage for its state after
it has learned exactly the micro-batches < n and forwarded exactly those. A stage runs its calls
in submission order, so the cut needs no drain; it adds two calls to each stage's order:

- mark(), submitted right before the stage's forward of micro-batch n: it holds what forwards
  change (BN running statistics, the input noise RNG) as of then;
- state_dict(marked=True), submitted right after the stage's learn of micro-batch n - 1: the
  weights, error synapses, optimizer state, step and lr progress as of then, with the marked
  forward-side state in place of the live one.

Under async, stage 0 forwards n (and up to its window beyond) before it learns n - 1, so its
state_dict call is submitted during the next step and the cut completes then; the stages above
complete at once. Under sync the stream is empty at a step's end and both calls go out at once.
The resulting state is the one a full drain at n would have given (the tests check this
bitwise): a resume starts a fresh stream at micro-batch n, i.e. at the checkpoint's data
position, so no micro-batch is lost or learned twice. Learns applied every `apply_every` must
divide a step's micro-batches, or a cut would miss gradients summed but not yet applied; the
pipeline drains first then (StreamPipeline.cut_drains).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from driver.pipeline.schedule import FORWARD, LEARN, Op, StageSequence

if TYPE_CHECKING:
    from driver.pipeline.stages import Stages


class Cut:
    """The stages' states at stream position `n`; `complete` once every call is submitted,
    `collect` waits for them (with the pipeline's step deadline)."""

    def __init__(
        self, n: int, seqs: Sequence[StageSequence], stages: Stages, timeout_s: float
    ) -> None:
        self.n, self.stages, self.timeout_s = n, stages, timeout_s
        self.marked = [False] * len(seqs)
        self.futures: list[Any] = [None] * len(seqs)
        self._taken = [False] * len(seqs)
        for s, seq in enumerate(seqs):
            if seq.next_f == n:  # forwarded everything fed so far, nothing beyond
                self._mark(s)
            if seq.next_l == n:  # learned everything fed so far
                self._take(s)

    @property
    def complete(self) -> bool:
        return all(self._taken)

    def before(self, op: Op) -> None:
        """Called before `op` is submitted to its stage."""
        if op.kind == FORWARD and op.mb == self.n and not self.marked[op.stage]:
            self._mark(op.stage)

    def after(self, op: Op) -> None:
        """Called after `op` was submitted to its stage."""
        if op.kind == LEARN and op.mb == self.n - 1 and not self._taken[op.stage]:
            self._take(op.stage)

    def _mark(self, s: int) -> None:
        self.stages.mark(s)
        self.marked[s] = True

    def _take(self, s: int) -> None:
        # unmarked: the stage has not been given forward n yet, so its live state is the cut's
        self.futures[s] = self.stages.state_dict(s, marked=self.marked[s])
        self._taken[s] = True

    def collect(self) -> list[dict[str, Any]]:
        """Each stage's state, stage 0 first (waits for the stages to reach the cut)."""
        assert self.complete, "cut collected before every stage's state_dict was submitted"
        futures = list(enumerate(self.futures))
        return self.stages.gather(futures, "state_dict", self.timeout_s)
