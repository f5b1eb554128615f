"""The pipeline's schedule: per-stage op orders, their dependencies, and a tick-by-tick table.

Each stage runs its ops strictly in order (a Ray actor called by one driver does). Stage s
first runs w_s = max(1, min(W - s, N)) forwards (W: the in-flight bound), then alternates one
learn and one forward (1F1B), then drains. Micro-batch m's learn on the last stage yields e_L;
with a broadcast error (rec-LRA `skip`, DFA) every other stage learns from that e_L directly,
in parallel; with a chained error (mirror, adjacent, LRA-E, FA, backprop) stage s waits for
stage s+1's learn of the same micro-batch.

`sync` (K = 2, N = M = 4 micro-batches, W = 2, broadcast error), one tick per op:

    tick | stage 0 | stage 1
    -----+---------+---------
       0 | F0      |
       1 | F1      | F0
       2 |         | L0
       3 | L0      | F1
       4 | F2      | L1
       5 | L1      | F2
       6 | F3      | L2
       7 | L2      | F3
       8 |         | L3
       9 | L3      | A
      10 | A       |

Every micro-batch of a step sees the step's starting weights; each stage applies (A) once,
after its last learn: the same weights as one process training on the whole batch.

`async` (same shape): a learn applies its own update at once (L+), nothing waits for a flush,
and the stream runs on across steps; a forward may therefore see weights up to w_s - 1 updates
older than those it learns with (its staleness, which stages measure and report):

    tick | stage 0 | stage 1
    -----+---------+---------
       0 | F0      |
       1 | F1      | F0
       2 |         | L0+
       3 | L0+     | F1
       4 | F2      | L1+
       5 | L1+     | F2
       ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from workers.chain import signal_source

FORWARD, LEARN, APPLY = "F", "L", "A"


@dataclass(frozen=True)
class Op:
    kind: str  # F, L or A
    stage: int
    mb: int = -1  # micro-batch index in the stream; -1 for A

    def __str__(self) -> str:
        return self.kind if self.kind == APPLY else f"{self.kind}{self.mb}"


def warmup(stage: int, window: int, n: int) -> int:
    """Forwards stage `stage` runs before its first learn: at most this many are cached."""
    return min(max(1, window - stage), n)


def stage_ops(stage: int, n: int, window: int, *, apply_at_end: bool) -> Iterator[Op]:
    """The ordered ops of one stage for a stream of `n` micro-batches."""
    w = warmup(stage, window, n)
    for m in range(w):
        yield Op(FORWARD, stage, m)
    for m in range(n - w):
        yield Op(LEARN, stage, m)
        yield Op(FORWARD, stage, m + w)
    for m in range(max(n - w, 0), n):
        yield Op(LEARN, stage, m)
    if apply_at_end and n:  # an empty step applies nothing (nor moves the lr schedule)
        yield Op(APPLY, stage)


def fuse_top(ops: list[Op]) -> list[Op]:
    """The top stage's ops with each learn right after its forward, wherever the stream put
    it: the top holds the labels, so it learns at once (the stream engine's forward_learn)."""
    return [
        x
        for op in ops
        if op.kind != LEARN
        for x in ((op, Op(LEARN, op.stage, op.mb)) if op.kind == FORWARD else (op,))
    ]


def dependencies(op: Op, stages: int, *, chained: bool, decoupled: bool = False) -> list[Op]:
    """The ops of other stages whose results `op` takes as arguments (`decoupled`: a learn
    takes none, every stage learning from its own head)."""
    if op.kind == FORWARD and op.stage > 0:
        return [Op(FORWARD, op.stage - 1, op.mb)]
    if op.kind == LEARN and op.stage < stages - 1 and not decoupled:
        return [Op(LEARN, signal_source(op.stage, stages, chained), op.mb)]
    return []


def ticks(
    stages: int, n: int, window: int, *, chained: bool, sync: bool, decoupled: bool = False
) -> list[list[Op | None]]:
    """Simulate unit-time ops: row t holds what each stage runs at tick t (None: idle).
    `decoupled`: every stage learns each micro-batch right after its forward (window 1)."""
    window = 1 if decoupled else window
    queues = [list(stage_ops(s, n, window, apply_at_end=sync)) for s in range(stages)]
    done: dict[Op, int] = {}
    rows: list[list[Op | None]] = []
    while any(queues):
        t = len(rows)
        row: list[Op | None] = [None] * stages
        for s, queue in enumerate(queues):
            if queue and all(
                done.get(d, t) < t
                for d in dependencies(queue[0], stages, chained=chained, decoupled=decoupled)
            ):
                row[s] = queue.pop(0)
        for op in row:
            if op is not None:
                done[op] = t
        rows.append(row)
    return rows


def render(rows: list[list[Op | None]], *, learn_applies: bool = False) -> str:
    """The tick table, as drawn in this module's docstring."""
    k = len(rows[0]) if rows else 0
    head = "tick | " + " | ".join(f"stage {s}" for s in range(k))
    lines = [head, "-----+" + "+".join(["-" * 9] * k)]
    for t, row in enumerate(rows):
        cells = [
            (
                "" if op is None else str(op) + ("+" if learn_applies and op.kind == LEARN else "")
            ).ljust(7)
            for op in row
        ]
        lines.append(f"{t:>4} | " + " | ".join(cells).rstrip())
    return "\n".join(lines)


class StageSequence:
    """One stage's ops, generated as micro-batches arrive: forwards until `window` are in
    flight, then one learn per forward; once the stream is closed, the remaining learns."""

    def __init__(self, stage: int, window: int, *, apply_at_end: bool) -> None:
        self.stage, self.window, self.apply_at_end = stage, window, apply_at_end
        self.next_f = self.next_l = 0
        self.applied = False

    def peek(self, available: int, closed: bool) -> Op | None:
        in_flight = self.next_f - self.next_l
        if in_flight < self.window:
            if self.next_f < available:
                return Op(FORWARD, self.stage, self.next_f)
            if not closed:
                return None  # keep the window full across steps: wait for the next data
        if in_flight > 0:
            return Op(LEARN, self.stage, self.next_l)
        if closed and self.apply_at_end and not self.applied and self.next_f == available > 0:
            return Op(APPLY, self.stage)  # an empty stream (a flush after a step) applies nothing
        return None

    def advance(self, op: Op) -> None:
        if op.kind == FORWARD:
            self.next_f += 1
        elif op.kind == LEARN:
            self.next_l += 1
        else:
            self.applied = True


class Stream:
    """The whole pipeline's op stream: which op each stage may submit next, given what the
    driver has already submitted (a Ray call can take a result that does not exist yet, as
    long as the call producing it was submitted first)."""

    def __init__(
        self, stages: int, window: int, *, chained: bool, sync: bool, decoupled: bool = False
    ) -> None:
        """`decoupled`: every stage learns each micro-batch right after its forward, from its
        own head (window 1, and a learn waits for nothing but its own forward)."""
        self.stages, self.chained, self.decoupled = stages, chained, decoupled
        window = 1 if decoupled else window
        self.seqs = [
            StageSequence(s, warmup(s, window, 1 << 30), apply_at_end=sync) for s in range(stages)
        ]
        self.available = 0  # micro-batches whose data the driver holds
        self.closed = False
        self.submitted: set[Op] = set()

    def ready(self) -> Iterator[Op]:
        """Submittable ops, in an order that keeps every stage's own order; mark them as
        submitted as they are yielded."""
        progress = True
        while progress:
            progress = False
            for seq in self.seqs:
                op = seq.peek(self.available, self.closed)
                deps = (
                    dependencies(op, self.stages, chained=self.chained, decoupled=self.decoupled)
                    if op is not None
                    else []
                )
                if op is None or not all(d in self.submitted for d in deps):
                    continue
                seq.advance(op)
                self.submitted.add(op)
                progress = True
                yield op

    def finished(self) -> bool:
        return self.closed and all(
            s.next_l == self.available and (s.applied or not s.apply_at_end or not self.available)
            for s in self.seqs
        )

    def forget(self, mb: int) -> None:
        """Drop micro-batch `mb`'s bookkeeping once every op of it was submitted."""
        self.submitted -= {Op(k, s, mb) for k in (FORWARD, LEARN) for s in range(self.stages)}
