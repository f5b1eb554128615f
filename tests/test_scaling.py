"""The scaling simulator (bench.scaling.sim) on hand-checkable cases; no Ray, no timing."""

from __future__ import annotations

import pytest

from bench.scaling.sim import RULES, StageCosts, one_process, simulate, step_seconds, window_of
from driver.pipeline.schedule import FORWARD, LEARN, Op, ticks


def uniform(k: int, f: float = 1.0, b: float = 1.0, **kw) -> StageCosts:
    return StageCosts(forward=(f,) * k, learn=(b,) * k, **kw)


def test_one_stage_is_the_sum_of_its_ops() -> None:
    c = StageCosts(forward=(0.3,), learn=(0.7,), apply=(0.05,))
    for m in (1, 4, 7):
        assert simulate(c, m, 1, chained=True, sync=True).makespan == pytest.approx(m * 1.0 + 0.05)
        assert one_process(c, m) == pytest.approx(m * 1.0 + 0.05)


@pytest.mark.parametrize("k,n,window", [(2, 4, 2), (3, 5, 3), (4, 6, 4), (3, 4, 6), (4, 3, 1)])
@pytest.mark.parametrize("chained", [True, False])
@pytest.mark.parametrize("sync", [True, False])
def test_unit_costs_match_schedule_ticks(
    k: int, n: int, window: int, chained: bool, sync: bool
) -> None:
    """Unit-time ops, free hops and calls: the simulation is schedule.ticks' table."""
    c = StageCosts(forward=(1.0,) * k, learn=(1.0,) * k, apply=(1.0,) * k if sync else ())
    trace = simulate(c, n, window, chained=chained, sync=sync)
    rows = ticks(k, n, window, chained=chained, sync=sync)
    assert trace.makespan == pytest.approx(len(rows))
    for t, row in enumerate(rows):
        for op in row:
            if op is not None:
                assert trace.start[op] == pytest.approx(t)


@pytest.mark.parametrize("k,m", [(2, 4), (2, 8), (3, 6), (4, 8)])
@pytest.mark.parametrize("rule", ["backprop_gpipe", "backprop_1f1b"])
def test_textbook_fill_and_drain(k: int, m: int, rule: str) -> None:
    """Equal stages (forward f, backward b): GPipe and 1F1B both take (M + K - 1)(f + b)."""
    f, b = 1.0, 2.0
    t = step_seconds(uniform(k, f, b), RULES[rule], m, sync=True)
    assert t == pytest.approx((m + k - 1) * (f + b))


def test_gpipe_runs_all_forwards_first() -> None:
    k, m = 3, 4
    w = window_of(RULES["backprop_gpipe"], k, m)
    trace = simulate(uniform(k), m, w, chained=True, sync=True)
    for s in range(k):
        last_f = max(trace.start[Op(FORWARD, s, i)] for i in range(m))
        first_l = min(trace.start[Op(LEARN, s, i)] for i in range(m))
        assert last_f < first_l


def test_broadcast_learns_in_parallel_chained_in_turn() -> None:
    """One micro-batch on 3 stages: the chained error walks down (3f + 3l), the broadcast one
    reaches both lower stages at once (3f + 2l); each chained hop pays the latency."""
    f, b = 1.0, 2.0
    c = uniform(3, f, b)
    assert simulate(c, 1, 3, chained=True, sync=False).makespan == pytest.approx(3 * f + 3 * b)
    assert simulate(c, 1, 3, chained=False, sync=False).makespan == pytest.approx(3 * f + 2 * b)
    h = 0.25
    c = uniform(3, f, b, latency=h)
    # 2 forward hops, then 2 signal hops in turn (chained) or 1 (broadcast)
    assert simulate(c, 1, 3, chained=True, sync=False).makespan == pytest.approx(
        3 * f + 3 * b + 4 * h
    )
    assert simulate(c, 1, 3, chained=False, sync=False).makespan == pytest.approx(
        3 * f + 2 * b + 3 * h
    )


def two_stages_with_hops(**kw) -> StageCosts:
    """Unit ops, 0.1 s latency, 100 B/s: 50 bytes up (0.5 s), 20 bytes down (0.2 s)."""
    return uniform(
        2, latency=0.1, bandwidth=100.0, fwd_bytes=(0.0, 50.0), signal_bytes=(20.0, 0.0), **kw
    )


def test_hop_time_is_latency_plus_bytes_over_bandwidth() -> None:
    c = two_stages_with_hops()
    # F0 [0,1], hop 0.6, F1+L1 [1.6,3.6], hop 0.3, L0 [3.9,4.9]
    assert simulate(c, 1, 2, chained=True, sync=False).makespan == pytest.approx(4.9)


def test_hop_on_cpu_is_work_of_the_receiving_op_and_shares_the_cores() -> None:
    """hop_cpu: bytes / bandwidth is compute of the op taking the hop (only the latency
    delays it), so on one core it adds to the total instead of overlapping."""
    c = two_stages_with_hops(hop_cpu=True)
    # F0 [0,1], +0.1, F1+L1 with 0.5 of hop work [1.1,3.6], +0.1, L0 with 0.2 [3.7,4.9]
    assert simulate(c, 1, 2, chained=True, sync=False).makespan == pytest.approx(4.9)
    # a stream on one core: all compute and all hop work in turn (latencies overlap)
    t = simulate(c, 6, 2, chained=True, sync=False, cores=1).makespan
    assert t >= 6 * (4.0 + 0.5 + 0.2) - 1e-9


def test_the_top_stage_signal_goes_by_its_own_bandwidth() -> None:
    """signal_bandwidth: only the top stage's signal (its two-result call: the object store);
    a boundary between lower stages goes by the link."""
    c = StageCosts(
        forward=(0.0,) * 3,
        learn=(0.0,) * 3,
        bandwidth=100.0,
        signal_bandwidth=10.0,
        signal_bytes=(10.0, 10.0, 0.0),
    )
    # L2 at 0, hop 2 -> 1 at 10 B/s: 1.0; hop 1 -> 0 at 100 B/s: 0.1
    assert simulate(c, 1, 3, chained=True, sync=False).makespan == pytest.approx(1.1)


def test_a_driver_slower_than_the_stages_bounds_the_stream() -> None:
    """The driver's share of each micro-batch runs in turn in its own process: with more of it
    per micro-batch than a stage's work, it sets the pace (no core limit)."""
    c = uniform(2, 0.5, 0.5, driver=2.0)
    t = simulate(c, 8, 2, chained=False, sync=False).makespan
    # the driver's 8 shares in turn, then the last micro-batch through both stages
    assert t == pytest.approx(8 * 2.0 + 0.5 + 1.0 + 0.5)
    assert simulate(uniform(2, 0.5, 0.5), 8, 2, chained=False, sync=False).makespan < 8 * 2.0


def test_the_driver_shares_the_cores_with_the_stages() -> None:
    """One core, one stage: every second of stage work and driver work in turn."""
    c = uniform(1, 1.0, 1.0, driver=1.0)
    assert simulate(c, 4, 1, chained=False, sync=False, cores=1).makespan == pytest.approx(12.0)


def test_core_limit_shares_the_cores() -> None:
    """Two learns ready at once on one core take twice as long; on two cores, no longer."""
    c = uniform(3, 1.0, 2.0)
    assert simulate(c, 1, 3, chained=False, sync=False, cores=1).makespan == pytest.approx(
        3 + 3 * 2.0
    )
    assert simulate(c, 1, 3, chained=False, sync=False, cores=2).makespan == pytest.approx(
        3 + 2 * 2.0
    )
    # a long stream on one core: the total work, whatever K (nothing idles while work waits)
    c = uniform(2, 1.0, 1.0)
    assert simulate(c, 8, 2, chained=False, sync=False, cores=1).makespan == pytest.approx(8 * 4.0)


def test_calls_cost_on_their_stage_and_the_top_fuses_forward_and_learn() -> None:
    c = uniform(2, 1.0, 1.0, call=0.1)
    # F0 1.1 | top F+L: 1.1 + 1.0 | L0 1.1
    assert simulate(c, 1, 2, chained=True, sync=False).makespan == pytest.approx(1.1 + 2.1 + 1.1)


def test_async_stream_has_no_bubble_in_the_steady_state() -> None:
    """Broadcast, equal stages: the per-step time of a long async stream nears M (f + l)."""
    c = uniform(4, 1.0, 2.0)
    t = step_seconds(c, RULES["rec_lra"], 8, sync=False, steps=16)
    assert 8 * 3.0 <= t <= 8 * 3.0 * 1.1


def test_hops_within_a_node_use_the_intra_node_bandwidth() -> None:
    """4 stages, 2 per node: the hop 0 -> 1 is within a node, 1 -> 2 crosses nodes."""
    c = StageCosts(
        forward=(1.0,) * 4,
        learn=(0.0,) * 4,
        bandwidth=10.0,
        intra_bandwidth=1000.0,
        node_size=2,
        fwd_bytes=(0.0, 100.0, 100.0, 100.0),
    )
    trace = simulate(c, 1, 4, chained=True, sync=False)
    assert trace.start[Op(FORWARD, 1, 0)] == pytest.approx(1.1)
    assert trace.start[Op(FORWARD, 2, 0)] == pytest.approx(2.1 + 10.0)
    assert trace.start[Op(FORWARD, 3, 0)] == pytest.approx(13.1 + 0.1)


@pytest.mark.parametrize("k,m,steps", [(2, 4, 3), (3, 3, 4), (4, 6, 2)])
@pytest.mark.parametrize("chained", [True, False])
def test_p2p_calls_cover_the_stream_once_in_each_stages_order(k, m, steps, chained) -> None:
    """The p2p engine's calls: every stage runs each forward and learn once, in the order
    stage_ops gives (the top: each learn right after its forward), and under sync one step is
    exactly stage_ops with its apply."""
    from bench.scaling.sim import p2p_calls
    from driver.pipeline.schedule import stage_ops

    n = m * steps
    calls = p2p_calls(k, n, k, steps, chained=chained, sync=False)
    assert len(calls) == steps
    for s in range(k):
        ran = [op for call in calls for op in call[s]]
        assert ran == list(stage_ops(s, n, k, apply_at_end=False))
    (one,) = p2p_calls(k, m, k, 1, chained=chained, sync=True)
    assert one == [list(stage_ops(s, m, k, apply_at_end=True)) for s in range(k)]
    with pytest.raises(ValueError, match="calls = 1"):
        p2p_calls(k, n, k, steps, chained=chained, sync=True)


def test_p2p_driver_is_a_barrier_under_sync_and_hidden_under_async() -> None:
    """Sync: a step's calls wait for the driver's CPU (d per micro-batch, m of them), so it
    adds in full. Async: a step's calls queue behind the previous step's and the driver
    gathers one step late, so once it is cheaper than a step only the first call waits. With
    no driver cost the async p2p engine is the stream engine's async schedule."""
    k, m, steps, d = 3, 4, 5, 0.1
    free = uniform(k, 1.0, 1.0)
    paid = uniform(k, 1.0, 1.0, driver=d)
    sync_free = simulate(free, m, k, chained=True, sync=True, calls=1).makespan
    assert simulate(paid, m, k, chained=True, sync=True, calls=1).makespan == pytest.approx(
        sync_free + m * d
    )
    n = m * steps
    stream = simulate(free, n, k, chained=False, sync=False).makespan
    assert simulate(free, n, k, chained=False, sync=False, calls=steps).makespan == pytest.approx(
        stream
    )
    assert simulate(paid, n, k, chained=False, sync=False, calls=steps).makespan == pytest.approx(
        stream + m * d
    )
    slow = uniform(k, 1.0, 1.0, driver=2.5)  # 10 s of driver a step: the driver sets the pace
    assert simulate(slow, n, k, chained=False, sync=False, calls=steps).makespan > steps * m * 2.5
