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


# -- decoupled stages (rule.topology = "decoupled"): window 1, no learn waits for a stage above


def _by_stage(trace, k: int) -> list[list[Op]]:
    """Each stage's ops in the order the simulation started them."""
    ops = sorted(trace.start, key=lambda op: trace.start[op])
    return [[op for op in ops if op.stage == s] for s in range(k)]


@pytest.mark.parametrize("k,n", [(2, 4), (3, 5), (4, 6), (8, 8)])
@pytest.mark.parametrize("sync", [True, False])
def test_decoupled_unit_costs_match_schedule_ticks(k: int, n: int, sync: bool) -> None:
    """Unit ops with the activation sent right after the forward (the p2p engine's way): the
    simulation is schedule.ticks(decoupled=True)'s table, whatever window it is given."""
    c = StageCosts(
        forward=(1.0,) * k, learn=(1.0,) * k, apply=(1.0,) * k if sync else (), fused_top=False
    )
    trace = simulate(c, n, k, chained=True, sync=sync, decoupled=True)
    rows = ticks(k, n, k, chained=True, sync=sync, decoupled=True)
    assert trace.makespan == pytest.approx(len(rows))
    for t, row in enumerate(rows):
        for op in row:
            if op is not None:
                assert trace.start[op] == pytest.approx(t)


@pytest.mark.parametrize("engine", ["stream", "p2p"])
@pytest.mark.parametrize("sync", [True, False])
def test_decoupled_runs_stage_ops_with_window_one(engine: str, sync: bool) -> None:
    """Each stage runs exactly stage_ops(s, n, 1): F0 L0 F1 L1 ... (and its apply under sync),
    on the stream engine (fused calls) and the p2p engine (its step calls)."""
    from bench.scaling.sim import p2p_calls
    from driver.pipeline.schedule import stage_ops

    k, m, steps = 4, 3, 1 if sync else 3
    n = m * steps
    c = StageCosts(
        forward=(0.3, 0.5, 0.2, 0.4),
        learn=(0.6, 0.9, 0.8, 0.1),
        apply=(0.1,) * k if sync else (),
        call=0.05,
        latency=0.01,
        fused_top=engine == "stream",
        driver=0.02,
    )
    calls = steps if engine == "p2p" else 0
    trace = simulate(c, n, k, chained=True, sync=sync, calls=calls, decoupled=True)
    want = [list(stage_ops(s, n, 1, apply_at_end=sync)) for s in range(k)]
    assert _by_stage(trace, k) == want
    if engine == "p2p":
        per_call = p2p_calls(k, n, k, steps, chained=True, sync=sync, decoupled=True)
        assert [[op for call in per_call for op in call[s]] for s in range(k)] == want


@pytest.mark.parametrize("engine", ["stream", "p2p"])
def test_decoupled_sync_step_has_no_backward_bubble(engine: str) -> None:
    """K = 8, unequal stages: every stage's learn of micro-batch m starts the moment its forward
    of m ends (it waits for no stage above), and nothing is sent down: the bottom stage runs
    its M forwards and learns back to back and is done long before the top."""
    k, m = 8, 8
    f = tuple(0.5 + 0.1 * s for s in range(k))
    lrn = tuple(1.0 + 0.2 * ((3 * s) % 5) for s in range(k))
    c = StageCosts(
        forward=f,
        learn=lrn,
        apply=(0.0,) * k,
        latency=0.05,
        signal_bytes=(1e9,) * k,  # a signal would take 1 s a hop: none is sent
        bandwidth=1e9,
        fused_top=engine == "stream",
    )
    trace = simulate(c, m, k, chained=True, sync=True, calls=int(engine == "p2p"), decoupled=True)
    for s in range(k):
        for mb in range(m):
            assert trace.start[Op(LEARN, s, mb)] == pytest.approx(trace.end[Op(FORWARD, s, mb)])
    assert trace.end[Op(LEARN, 0, m - 1)] == pytest.approx(m * (f[0] + lrn[0]))
    chained = simulate(c, m, k, chained=True, sync=True, calls=int(engine == "p2p"))
    assert chained.start[Op(LEARN, 0, 0)] > trace.end[Op(LEARN, 0, m - 1)]


def test_decoupled_stream_activation_waits_for_the_fused_call() -> None:
    """The stream engine runs a decoupled stage's forward and learn as one call (two results):
    the stage above takes the activation when the call ends; the p2p engine sends it right
    after the forward."""
    k, m = 3, 2
    fused = simulate(uniform(k, 1.0, 2.0), m, 1, chained=True, sync=True, decoupled=True)
    p2p = simulate(
        uniform(k, 1.0, 2.0, fused_top=False), m, 1, chained=True, sync=True, decoupled=True
    )
    for s in range(k - 1):
        for mb in range(m):
            assert fused.start[Op(FORWARD, s + 1, mb)] >= fused.end[Op(LEARN, s, mb)] - 1e-9
        # the first micro-batch goes up as soon as each forward ends, before that stage learns
        up, below = p2p.start[Op(FORWARD, s + 1, 0)], p2p.end[Op(FORWARD, s, 0)]
        assert up == pytest.approx(below) and up < p2p.end[Op(LEARN, s, 0)]
    # one micro-batch: fused, each stage's call in turn; p2p, the forwards in turn, then the
    # top's learn
    one = uniform(k, 1.0, 2.0)
    t = simulate(one, 1, 1, chained=True, sync=False, decoupled=True).makespan
    assert t == pytest.approx(3 * 3.0)
    p2p_one = uniform(k, 1.0, 2.0, fused_top=False)
    t = simulate(p2p_one, 1, 1, chained=True, sync=False, decoupled=True).makespan
    assert t == pytest.approx(3 * 1.0 + 2.0)


def test_decoupled_sync_step_beats_the_chained_rule_at_k8() -> None:
    """Equal stages (f = 1, l = 2), K = 8, M = 32, sync. p2p: decoupled fills with forwards
    only, (K - 1) f + M (f + l) = 103, against 1F1B's (M + K - 1)(f + l) = 117 for the chained
    rule and backprop. On the stream engine the fused call's fill is (K - 1)(f + l), so
    compute alone ties at 117, and decoupled wins on the driver: K calls a micro-batch
    against 2K - 1. An auxiliary head costing a quarter of every stage below the top
    overturns the p2p gain (the bubble is 14 of 117)."""
    from bench.scaling.project import driver_calls

    k, m, f, b = 8, 32, 1.0, 2.0
    dec, mirror, bp = (RULES[r] for r in ("rec_lra_decoupled", "rec_lra_mirror", "backprop_1f1b"))
    p2p = uniform(k, f, b, fused_top=False)
    t_dec = step_seconds(p2p, dec, m, sync=True)
    assert t_dec == pytest.approx((k - 1) * f + m * (f + b))
    for rule in (mirror, bp):
        assert step_seconds(p2p, rule, m, sync=True) == pytest.approx((m + k - 1) * (f + b))
    stream = uniform(k, f, b)
    assert step_seconds(stream, dec, m, sync=True) == pytest.approx((m + k - 1) * (f + b))
    per_call = 0.1  # the driver's CPU per call: 1.5 s per micro-batch chained, 0.8 decoupled

    def driven(decoupled: bool) -> StageCosts:
        calls = driver_calls(k, m, sync=True, decoupled=decoupled)
        return uniform(k, f, b, driver=per_call * calls)

    t_stream_dec = step_seconds(driven(True), dec, m, sync=True)
    assert t_stream_dec < step_seconds(driven(False), mirror, m, sync=True)
    headed = StageCosts(
        forward=(1.25 * f,) * (k - 1) + (f,), learn=(1.25 * b,) * (k - 1) + (b,), fused_top=False
    )
    assert step_seconds(headed, dec, m, sync=True) > step_seconds(p2p, mirror, m, sync=True)


@pytest.mark.parametrize("sync", [True, False])
def test_decoupled_async_stream_has_no_bubble(sync: bool) -> None:
    """Async, equal stages: the steady step of decoupled stages is M (f + l) on both engines,
    sync adds only a fill (p2p: forwards; stream: whole calls)."""
    k, m = 4, 8
    dec = RULES["rec_lra_decoupled"]
    for fused in (True, False):
        c = uniform(k, 1.0, 2.0, fused_top=fused)
        t = step_seconds(c, dec, m, sync=sync, steps=16)
        fill = (k - 1) * (3.0 if fused else 1.0)
        assert m * 3.0 <= t <= m * 3.0 + (fill if sync else fill / 16) + 1e-9


def test_decoupled_driver_calls_match_the_stream_engine() -> None:
    """The projection charges the stream's driver K calls a micro-batch for decoupled stages
    (one forward_learn each), 2K - 1 otherwise: counted on the in-process stream."""
    from test_pipeline_local import RANDOM, _base, calls_per_step

    from bench.scaling.project import driver_calls
    from driver.config.pipeline import PipelineConfig
    from driver.pipeline.stream import LocalPipeline
    from workers.chain import stage_specs
    from workers.rules import RuleConfig

    k, m, steps = 3, 4, 3
    for schedule in ("sync", "async"):
        cfg = PipelineConfig(stages=k, schedule=schedule, micro_batches=m)
        rule = RuleConfig(topology="decoupled", **RANDOM)
        pipe = LocalPipeline(stage_specs(_base(rule), [0, 1, 3, 5]), cfg)
        counts = calls_per_step(pipe, steps, m)
        pipe.close()
        per_step = driver_calls(k, m, sync=schedule == "sync", decoupled=True) * m
        assert counts[-1] - counts[0] == per_step * (steps - 1)
        assert per_step < driver_calls(k, m, sync=schedule == "sync") * m


def _profile(fraction: float | None = None) -> dict:
    """A 4-block model on a free link: block seconds per sample, 2 samples a micro-batch."""
    prof = {
        "micro_batch": 2,
        "micro_batches": 4,
        "link": {"call_s": 0.0, "latency_s": 0.0, "bandwidth_Bps": float("inf")},
        "models": {
            "toy": {
                "out_bytes": [8.0, 8.0, 8.0, 8.0],
                "rec_lra_mirror": {
                    "forward_s": [1.0, 2.0, 3.0, 4.0],
                    "learn_s": [2.0, 4.0, 6.0, 8.0],
                    "apply_s": [0.0] * 4,
                },
            }
        },
    }
    return prof if fraction is None else {**prof, "aux_head_fraction": fraction}


def test_the_auxiliary_head_costs_every_stage_but_the_top() -> None:
    """Decoupled stages cost their blocks plus a head on their top block's output: a fraction
    of that block's forward and learn (the profile's aux_head_fraction; 0.25 where MACs are
    unknown), none on the top stage; the cut is the one without heads (partition.py)."""
    from bench.scaling.project import AUX_HEAD_FRACTION, stage_costs

    for prof, h in ((_profile(0.5), 0.5), (_profile(), AUX_HEAD_FRACTION)):
        plain, bounds = stage_costs(prof, "toy", "rec_lra_mirror", 3)
        dec, dec_bounds = stage_costs(prof, "toy", "rec_lra_mirror", 3, decoupled=True)
        assert dec_bounds == bounds
        for s, z in enumerate(bounds[1:]):
            extra = h * 2 * (z) if s < 2 else 0.0  # the top block z - 1 costs 2z a sample
            assert dec.forward[s] == pytest.approx(plain.forward[s] + extra)
            assert dec.learn[s] == pytest.approx(plain.learn[s] + 2 * extra)


def test_aux_head_macs_of_the_resnets() -> None:
    """The recipe's rule.aux_head = "conv2" on a basic block's output is three quarters of that
    block (layer1 of ResNet-18/34 at 56x56: 3x3 conv 64 -> 128 at stride 2, a quarter, then
    128 -> 128 at 28x28, a half); on a bottleneck (ResNet-50) the head is sized by the block's
    3x3 width, a quarter of its output's: about 1.6 blocks, and on a 7x7 map (stride 1) 2.65."""
    from bench.scaling.project import aux_head_ratios, load_profile

    prof = load_profile("bench/profiles/a100.toml")
    r18 = aux_head_ratios(prof, "resnet18")
    assert r18[1] == pytest.approx(0.75, abs=0.01)  # layer1.0
    assert max(r18[1:-1]) < 1.3
    r50 = aux_head_ratios(prof, "resnet50")
    assert r50[2] == pytest.approx(1.59, abs=0.01)  # layer1.1
    assert r50[-2] == pytest.approx(2.65, abs=0.01)  # layer4.2, 7x7


def test_the_k8_projection_has_decoupled_rows() -> None:
    """Every decoupled schedule (stream and p2p, sync and async) is projected at K = 8 beside
    the chained rule and backprop 1F1B, and each row says what a stage holds: one micro-batch
    decoupled, K - s under 1F1B."""
    from bench.scaling.main import RULES_SHOWN, SIDE_BY_SIDE
    from bench.scaling.project import DECOUPLED, PROJECTED, load_profile, project

    assert set(DECOUPLED) == {
        "rec_lra_decoupled",
        "rec_lra_decoupled_p2p",
        "rec_lra_decoupled_async",
        "rec_lra_decoupled_async_p2p",
    }
    assert set(DECOUPLED) <= set(RULES_SHOWN) <= set(PROJECTED)
    shown = {r for rules in SIDE_BY_SIDE.values() for r in rules if r}
    assert shown <= set(PROJECTED)
    rules = [*DECOUPLED, "rec_lra_mirror_p2p", "backprop_1f1b_p2p"]
    proj = project(load_profile("bench/profiles/a100.toml"), ["resnet18"], (8,), rules=rules)
    row = proj["resnet18"]
    for rule in DECOUPLED:
        assert 0.0 < row[rule]["8"]["efficiency"] <= 1.0
        assert row[rule]["8"]["held_micro_batches"] == [1] * 8
    assert row["backprop_1f1b_p2p"]["8"]["held_micro_batches"] == [8 - s for s in range(8)]
    # the stream engine: K driver calls a micro-batch against 2K - 1
    full = project(
        load_profile("bench/profiles/a100.toml"),
        ["resnet18"],
        (8,),
        rules=["rec_lra_decoupled", "rec_lra_mirror"],
    )["resnet18"]
    assert full["rec_lra_decoupled"]["8"]["efficiency"] > full["rec_lra_mirror"]["8"]["efficiency"]
