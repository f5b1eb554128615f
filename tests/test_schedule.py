"""The pipeline schedule (driver/pipeline/schedule.py), checked against its own contract.

(a) `ticks`: every op exactly once, each stage in its `stage_ops` order, every op strictly after
    what it takes as arguments, never more micro-batches in flight than the stage's window; a
    broadcast error lets stages learn one micro-batch in parallel, a chained one never does.
(b) `Stream` (what the Ray pipeline submits from): fed all at once it yields `stage_ops` per
    stage; fed in chunks it yields a valid order (dependencies first, windows kept, drained).
(c) The tick tables drawn in the module docstring are what `render(ticks(...))` prints.
"""

from __future__ import annotations

import random
import re

import pytest

import driver.pipeline.schedule as schedule
from driver.pipeline.schedule import (
    APPLY,
    FORWARD,
    LEARN,
    Op,
    Stream,
    dependencies,
    render,
    stage_ops,
    ticks,
    warmup,
)

STAGES = [1, 2, 3, 4]
WINDOWS = [1, 2, 3, 4, 5]
NS = range(1, 8)


def _expected_deps(op: Op, k: int, chained: bool) -> list[Op]:
    """The dependencies as the brief states them, written independently of `dependencies`."""
    if op.kind == FORWARD:
        return [Op(FORWARD, op.stage - 1, op.mb)] if op.stage > 0 else []
    if op.kind == LEARN:
        if op.stage == k - 1:
            return []
        return [Op(LEARN, op.stage + 1 if chained else k - 1, op.mb)]
    return []


def _check_stage_order(seq: list[Op], stage: int, n: int, window: int, sync: bool) -> None:
    """One stage's ops: each F and L once, in micro-batch order, L(m) after F(m), A last (sync
    only), at most max(1, window - stage) micro-batches forwarded but not learned."""
    cap = max(1, window - stage)
    assert all(op.stage == stage for op in seq)
    fs = [op.mb for op in seq if op.kind == FORWARD]
    ls = [op.mb for op in seq if op.kind == LEARN]
    applies = [i for i, op in enumerate(seq) if op.kind == APPLY]
    assert fs == list(range(n)), f"stage {stage}: forwards {fs}"
    assert ls == list(range(n)), f"stage {stage}: learns {ls}"
    assert applies == ([len(seq) - 1] if sync and n else []), f"stage {stage}: applies at {applies}"
    in_flight = 0
    for op in seq:
        in_flight += {FORWARD: 1, LEARN: -1, APPLY: 0}[op.kind]
        assert 0 <= in_flight <= cap, f"stage {stage}: {in_flight} in flight at {op} (cap {cap})"
    assert in_flight == 0


# -- (a) the tick simulation -----------------------------------------------------------------------


def test_stage_ops_shape():
    """Warmup forwards, then strict 1F1B, then the drain, as the docstring describes."""
    assert [str(o) for o in stage_ops(0, 4, 2, apply_at_end=True)] == [
        "F0",
        "F1",
        "L0",
        "F2",
        "L1",
        "F3",
        "L2",
        "L3",
        "A",
    ]
    assert [str(o) for o in stage_ops(1, 4, 2, apply_at_end=False)] == [
        "F0",
        "L0",
        "F1",
        "L1",
        "F2",
        "L2",
        "F3",
        "L3",
    ]
    assert [str(o) for o in stage_ops(0, 2, 5, apply_at_end=False)] == ["F0", "F1", "L0", "L1"]
    assert [warmup(s, 3, 7) for s in range(5)] == [3, 2, 1, 1, 1]
    assert warmup(0, 5, 2) == 2


@pytest.mark.parametrize("k", STAGES)
@pytest.mark.parametrize("chained", [True, False])
def test_dependencies_match_the_rule(k, chained):
    for s in range(k):
        for op in (Op(FORWARD, s, 3), Op(LEARN, s, 3), Op(APPLY, s)):
            assert dependencies(op, k, chained=chained) == _expected_deps(op, k, chained), op


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("chained", [True, False])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("k", STAGES)
def test_ticks_are_a_valid_schedule(k, window, chained, sync):
    for n in NS:
        rows = ticks(k, n, window, chained=chained, sync=sync)
        assert all(len(row) == k for row in rows)
        when: dict[Op, int] = {}
        for t, row in enumerate(rows):
            for s, op in enumerate(row):
                if op is None:
                    continue
                assert op.stage == s, f"{op} in column {s}"
                assert op not in when, f"{op} runs twice"
                when[op] = t
        assert rows and any(rows[-1]), "trailing idle tick"
        for s in range(k):
            seq = [row[s] for row in rows if row[s] is not None]
            _check_stage_order(seq, s, n, window, sync)
            assert seq == list(stage_ops(s, n, window, apply_at_end=sync)), f"stage {s}"
        for op, t in when.items():
            for dep in _expected_deps(op, k, chained):
                assert when[dep] < t, f"K={k} n={n} W={window}: {op}@{t} before {dep}@{when[dep]}"
        # the simulation runs an op as soon as it may: no stage idles while its next op is ready
        for s in range(k):
            seq = [row[s] for row in rows if row[s] is not None]
            for i, op in enumerate(seq):
                prev = when[seq[i - 1]] if i else -1
                ready = max([prev] + [when[d] for d in _expected_deps(op, k, chained)]) + 1
                assert when[op] == ready, f"K={k} n={n} W={window}: {op} waited"


def _learners(row: list[Op | None]) -> list[Op]:
    return [op for op in row if op is not None and op.kind == LEARN]


@pytest.mark.parametrize("sync", [True, False])
def test_broadcast_error_learns_in_parallel(sync):
    # The docstring's own example: K = 3, W = 3, broadcast: stages 0 and 1 learn micro-batch 0
    # together, one tick after the last stage produced e_L.
    rows = ticks(3, 6, 3, chained=False, sync=sync)
    assert [str(op) for op in _learners(rows[4])] == ["L0", "L0"]
    for k in (3, 4):
        for window in WINDOWS:
            for n in range(2, 8):
                rows = ticks(k, n, window, chained=False, sync=sync)
                same = [
                    t
                    for t, row in enumerate(rows)
                    if len({op.mb for op in _learners(row)}) < len(_learners(row))
                ]
                assert same, f"K={k} n={n} W={window}: no two stages learn one micro-batch at once"
    # K = 2 has one stage below the last: parallel learning there needs a window >= 3
    rows = ticks(2, 4, 3, chained=False, sync=sync)
    assert any(len(_learners(row)) == 2 for row in rows)


@pytest.mark.parametrize("sync", [True, False])
def test_chained_error_never_learns_one_micro_batch_twice_at_once(sync):
    for k in STAGES:
        for window in WINDOWS:
            for n in NS:
                for t, row in enumerate(ticks(k, n, window, chained=True, sync=sync)):
                    mbs = [op.mb for op in _learners(row)]
                    assert len(mbs) == len(set(mbs)), f"K={k} n={n} W={window} tick {t}: {row}"


def test_broadcast_is_faster_than_chained():
    for k in (3, 4):
        for window in WINDOWS:
            for n in range(2, 8):
                fast = len(ticks(k, n, window, chained=False, sync=True))
                slow = len(ticks(k, n, window, chained=True, sync=True))
                assert fast < slow, f"K={k} n={n} W={window}: {fast} vs {slow} ticks"


# -- (b) the incremental stream --------------------------------------------------------------------


def _run_stream(
    k: int,
    window: int,
    chunks: list[int],
    *,
    chained: bool,
    sync: bool,
    forget: bool,
    ready_before_close: bool = True,
) -> tuple[Stream, list[tuple[Op, int, bool]]]:
    """Feed `chunks` micro-batches at a time, calling ready() after each; then close and drain.
    Returns the stream and every yielded op with the data available and `closed` when yielded.
    With `forget`, mb's bookkeeping is dropped as the Ray pipeline does: as soon as every stage's
    learn of it was yielded, inside the iteration."""
    st = Stream(k, window, chained=chained, sync=sync)
    out: list[tuple[Op, int, bool]] = []
    learned: dict[int, int] = {}

    def pull() -> None:
        for op in st.ready():
            out.append((op, st.available, st.closed))
            if op.kind == LEARN:
                learned[op.mb] = learned.get(op.mb, 0) + 1
                if forget and learned[op.mb] == k:
                    st.forget(op.mb)

    for c in chunks:
        st.available += c
        if ready_before_close:
            pull()
        assert not st.finished()
    st.closed = True
    pull()
    return st, out


def _check_stream(
    out: list[tuple[Op, int, bool]], k: int, n: int, window: int, chained: bool, sync: bool
) -> None:
    ops = [op for op, _, _ in out]
    assert len(ops) == len(set(ops)), "an op was yielded twice"
    pos = {op: i for i, op in enumerate(ops)}
    for op, available, closed in out:
        if op.kind == FORWARD:
            assert op.mb < available, f"{op} yielded before its data ({available} available)"
        if op.kind == APPLY:
            assert closed, f"{op} yielded before the stream was closed"
        for dep in _expected_deps(op, k, chained):
            assert dep in pos and pos[dep] < pos[op], f"{op} yielded before {dep}"
    for s in range(k):
        _check_stage_order([op for op in ops if op.stage == s], s, n, window, sync)


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("chained", [True, False])
@pytest.mark.parametrize("k", STAGES)
def test_stream_with_all_data_matches_stage_ops(k, chained, sync):
    for window in WINDOWS:
        for n in range(0, 8):
            for forget in (False, True):
                for early in (False, True):  # sync closes first; async pulls before closing
                    st, out = _run_stream(
                        k,
                        window,
                        [n],
                        chained=chained,
                        sync=sync,
                        forget=forget,
                        ready_before_close=early,
                    )
                    assert st.finished()
                    _check_stream(out, k, n, window, chained, sync)
                    if n == 0:  # an empty stream runs nothing, not even an apply
                        assert out == []
                    for s in range(k):
                        got = [op for op, _, _ in out if op.stage == s]
                        assert got == list(stage_ops(s, n, window, apply_at_end=sync)), (
                            f"K={k} W={window} n={n} stage {s}: {[str(o) for o in got]}"
                        )
                    assert list(st.ready()) == []


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("chained", [True, False])
@pytest.mark.parametrize("k", STAGES)
def test_stream_fed_in_chunks_is_valid(k, chained, sync):
    rng = random.Random(1234 + 10 * k + 2 * chained + sync)
    patterns = [[1] * 7, [2] * 4, [3, 3, 1], [1, 0, 2, 0, 5]]
    patterns += [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(6)]
    for window in WINDOWS:
        for chunks in patterns:
            for forget in (False, True):
                st, out = _run_stream(k, window, chunks, chained=chained, sync=sync, forget=forget)
                assert st.finished(), f"K={k} W={window} chunks {chunks}: not drained"
                _check_stream(out, k, sum(chunks), window, chained, sync)
                assert list(st.ready()) == []


def test_stream_fed_in_chunks_keeps_the_window_full():
    """A stage never learns early for want of data: fed in chunks, each stage runs exactly the
    stage_ops order, so async overlaps micro-batches across steps instead of flushing."""
    _, out = _run_stream(2, 3, [2, 2], chained=True, sync=True, forget=False)
    got = [str(op) for op, _, _ in out if op.stage == 0]
    assert got == [str(o) for o in stage_ops(0, 4, 3, apply_at_end=True)]
    assert got == ["F0", "F1", "F2", "L0", "F3", "L1", "L2", "L3", "A"]
    # one micro-batch per step: still three in flight on stage 0 of three
    _, out = _run_stream(3, 3, [1] * 4, chained=False, sync=False, forget=True)
    got = [str(op) for op, _, _ in out if op.stage == 0]
    assert got == ["F0", "F1", "F2", "L0", "F3", "L1", "L2", "L3"]


def test_stage_ops_of_an_empty_stream():
    """Nothing to learn, nothing to apply: an extra optimizer step would move the schedule."""
    assert list(stage_ops(0, 0, 2, apply_at_end=True)) == []
    assert list(stage_ops(0, 1, 2, apply_at_end=True))[-1] == Op(APPLY, 0)


def test_stream_not_finished_until_drained():
    st = Stream(2, 2, chained=False, sync=True)
    st.available = 3
    first = list(st.ready())
    assert first and not st.finished()
    assert all(op.kind != APPLY for op in first)
    st.closed = True
    rest = list(st.ready())
    assert {op for op in rest if op.kind == APPLY} == {Op(APPLY, 0), Op(APPLY, 1)}
    assert st.finished()


def test_stream_async_runs_across_chunks_without_closing():
    """async: the stream keeps going as data arrives; after its last forward each stage holds
    max(1, W - s) - 1 micro-batches (it learns one per forward) until the close drains them."""
    st = Stream(3, 3, chained=False, sync=False)
    seen: list[Op] = []
    for _ in range(4):
        st.available += 2
        seen += list(st.ready())
    for stage, held in enumerate((2, 1, 0)):
        assert sum(op.kind == LEARN and op.stage == stage for op in seen) == 8 - held
    assert not st.finished()
    st.closed = True
    rest = list(st.ready())
    assert sorted((op.stage, op.mb) for op in rest) == [(0, 6), (0, 7), (1, 7)]
    assert st.finished()


# -- (c) the docstring tables ----------------------------------------------------------------------


def _doc_tables() -> list[list[str]]:
    """The indented tables of the module docstring, as lists of lines (indent removed)."""
    tables: list[list[str]] = []
    current: list[str] | None = None
    for line in schedule.__doc__.splitlines():
        if line.startswith("    tick |"):
            current = []
            tables.append(current)
        if current is not None:
            if line.startswith("    "):
                current.append(line[4:].rstrip())
            else:
                current = None
    return tables


def _data_rows(lines: list[str]) -> list[str]:
    return [ln for ln in lines if re.match(r"\s*\d+ \|", ln)]


def test_docstring_has_the_two_tables():
    tables = _doc_tables()
    assert len(tables) == 2
    assert _data_rows(tables[0]) and _data_rows(tables[1])
    assert tables[1][-1].strip() == "..."


def test_sync_docstring_table_matches_render():
    (doc, _) = _doc_tables()
    drawn = render(ticks(2, 4, 2, chained=False, sync=True)).splitlines()
    assert doc[0] == drawn[0]
    assert _data_rows(doc) == _data_rows(drawn)
    assert len(_data_rows(doc)) == 11
    # K = 2 has no stage between the first and the last: chained gives the same table
    assert render(ticks(2, 4, 2, chained=True, sync=True)) == render(
        ticks(2, 4, 2, chained=False, sync=True)
    )


def test_async_docstring_table_matches_render_where_shown():
    (_, doc) = _doc_tables()
    drawn = render(ticks(2, 4, 2, chained=False, sync=False), learn_applies=True).splitlines()
    assert doc[0] == drawn[0]
    shown = _data_rows(doc)
    assert len(shown) == 6
    assert shown == _data_rows(drawn)[: len(shown)]
    assert not any("A" in row for row in _data_rows(drawn)), "async never applies at the end"


def test_docstring_rule_line_matches_render():
    for doc, sync in zip(_doc_tables(), (True, False), strict=True):
        drawn = render(ticks(2, 4, 2, chained=False, sync=sync), learn_applies=not sync)
        assert doc[1] == drawn.splitlines()[1]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("chained", [True, False])
def test_an_open_stream_forwards_everything_fed_on_every_stage(k, chained):
    """Once ready() stops on an open stream, every stage has forwarded every micro-batch fed:
    an open stream waits only for data. The p2p engine's checkpoint cut relies on it (a stage
    holds its forward-side state at the start of the call after the cut)."""
    rng = random.Random(k)
    for window in range(1, 9):
        stream = Stream(k, window, chained=chained, sync=False)
        for _ in range(8):
            stream.available += rng.randint(1, 5)
            list(stream.ready())
            assert [seq.next_f for seq in stream.seqs] == [stream.available] * k
