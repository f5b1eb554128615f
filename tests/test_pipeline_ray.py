"""The Ray pipeline on a real local cluster: parity with one process, schedules, failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch
from ray.exceptions import RayActorError

from cluster.errors import ActorDied, ActorError, ActorTimeout, PlacementError
from cluster.group import ActorGroup
from driver.config.pipeline import PipelineConfig
from driver.pipeline.stream import RayPipeline
from driver.run.stats import StatsBook
from workers.chain import LocalRunner, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec

pytestmark = pytest.mark.ray

MODEL = ModelConfig(name="resnet8", width=4)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cluster():
    here = Path(__file__).resolve().parent  # workers import this module's helper actors
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        namespace="reclra-tests",
        runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}},
    )
    yield
    ray.shutdown()


def _base(rule: RuleConfig, dtype: str = "float64") -> StageSpec:
    n = len(model_plan(MODEL, SHAPE, 10))
    return StageSpec(
        model=MODEL,
        rule=rule,
        optim=OptimConfig(),
        input_shape=SHAPE,
        num_classes=10,
        blocks=(0, n),
        dtype=dtype,
    )


def _batches(n: int, size: int = 12):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, *SHAPE, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def _assert_same_units(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in b:
        for key, t in b[name]["tensors"].items():
            torch.testing.assert_close(
                a[name]["tensors"][key], t, rtol=1e-12, atol=1e-12, msg=f"{name}.{key}"
            )


PARITY = [
    ("rec_lra-skip", RuleConfig(name="rec_lra", topology="skip", input_noise=0.0), [0, 2, 5]),
    (
        "rec_lra-mirror",
        RuleConfig(name="rec_lra", topology="mirror", input_noise=0.0),
        [0, 1, 3, 5],
    ),
    ("backprop", RuleConfig(name="backprop", input_noise=0.0), [0, 3, 5]),
    ("backprop-k3", RuleConfig(name="backprop", input_noise=0.0), [0, 1, 2, 5]),
    ("rec_lra-skip-k3", RuleConfig(name="rec_lra", topology="skip", input_noise=0.0), [0, 1, 4, 5]),
]


@pytest.mark.parametrize("name, rule, bounds", PARITY, ids=[p[0] for p in PARITY])
def test_sync_pipeline_matches_one_process(cluster, name, rule, bounds):
    """K Ray actors in `sync` give the weights of one in-process stage, to 1e-12 in float64."""
    base = _base(rule)
    local = LocalRunner([base])
    pipe = RayPipeline(
        stage_specs(base, bounds), PipelineConfig(stages=len(bounds) - 1, micro_batches=3)
    )
    try:
        for x, y in _batches(3):
            done = pipe.step(x, y, 3)
            ref = local.step(x, y, 3)
            assert len(done) == 3  # one (logits, labels) per micro-batch
            torch.testing.assert_close(
                torch.cat([lg for lg, _ in done]), ref[0][0], rtol=1e-12, atol=1e-12
            )
        _assert_same_units(pipe.state_dict()["units"], local.state_dict()["units"])
        torch.testing.assert_close(
            pipe.infer(_batches(1)[0][0]), local.infer(_batches(1)[0][0]), rtol=1e-12, atol=1e-12
        )
        stats = pipe.drain_stats(wait=True)
        assert {s for s, _ in stats} == set(range(len(bounds) - 1))
        assert all(st.micro_batches == 3 and st.bytes_received > 0 for _, st in stats)
        assert all(st.cached == 0 and max(st.staleness) == 0 for _, st in stats)  # sync
    finally:
        pipe.close()


def test_async_pipeline_applies_per_micro_batch_and_reports_staleness(cluster):
    base = _base(RuleConfig(name="rec_lra", input_noise=0.0), dtype="float32")
    cfg = PipelineConfig(
        stages=2, micro_batches=4, schedule="async", max_in_flight=3, apply_every=1
    )
    pipe = RayPipeline(stage_specs(base, [0, 2, 5]), cfg)
    try:
        seen = 0
        for x, y in _batches(4):
            seen += sum(len(lbl) for _, lbl in pipe.step(x, y, 4))
        seen += sum(len(lbl) for _, lbl in pipe.flush())
        assert seen == 4 * 12  # every micro-batch came back exactly once
        book = StatsBook()
        book.add(pipe.drain_stats(wait=True))
        assert [book.stages[s].micro_batches for s in (0, 1)] == [16, 16]
        assert book.stages[0].staleness_max >= 1, "stage 0 runs ahead: some forwards are stale"
        for stage in (0, 1):  # stage s runs at most window - s forwards ahead of its learns
            assert book.stages[stage].staleness_max <= pipe.window - stage - 1
        assert pipe.state_dict()["step"] == 16  # one apply per micro-batch
    finally:
        pipe.close()


def _dead(actor) -> bool:  # noqa: ANN001
    try:
        ray.get(actor.pop_stats.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def test_a_failing_stage_fails_the_step_naming_it_and_nothing_is_left_running(cluster):
    base = _base(RuleConfig(name="rec_lra", input_noise=0.0), dtype="float32")
    pipe = RayPipeline(stage_specs(base, [0, 2, 5]), PipelineConfig(stages=2, micro_batches=2))
    x, y = _batches(1)[0]
    x[0, 0, 0, 0] = float("nan")  # non-finite activations: stage 0 refuses its update
    actors = list(pipe.group.actors)
    with pytest.raises(ActorError) as info:
        pipe.step(x, y, 2)
    assert info.value.index in (0, 1) and "non-finite" in str(info.value)
    assert f"stage {info.value.index}" in str(info.value)
    assert all(_dead(a) for a in actors)


def test_a_killed_middle_stage_is_named_though_the_driver_never_waits_on_it(cluster):
    """K = 3, chained: the driver does not wait on stage 1's learn (only stage 0 takes it), and
    every call of the others that takes stage 1's results fails with its death; the error
    still names stage 1, the one whose process is gone."""
    base = _base(RuleConfig(name="rec_lra"), dtype="float32")
    cfg = PipelineConfig(stages=3, micro_batches=3, step_timeout_s=60, transport="gloo")
    pipe = RayPipeline(stage_specs(base, [0, 1, 3, 5]), cfg)
    x, y = _batches(1)[0]
    pipe.step(x, y, 3)
    ray.kill(pipe.group.actors[1], no_restart=True)
    with pytest.raises(ActorDied) as info:
        pipe.step(x, y, 3)
    assert info.value.index == 1 and str(info.value).startswith("stage 1: ")


def test_a_stage_past_its_deadline_times_out_naming_it_and_the_key(cluster):
    base = _base(RuleConfig(name="rec_lra"), dtype="float32")
    pipe = RayPipeline(stage_specs(base, [0, 2, 5]), PipelineConfig(stages=2))
    pipe.cfg = PipelineConfig(stages=2, step_timeout_s=1e-4)  # no step can finish in 0.1 ms
    actors = list(pipe.group.actors)
    x, y = _batches(1, size=256)[0]
    with pytest.raises(ActorTimeout) as info:
        pipe.step(x, y, 1)
    assert "pipeline.step_timeout_s" in str(info.value) and info.value.index in (0, 1)
    assert all(_dead(a) for a in actors)


class Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def work(self) -> float:
        time.sleep(self.seconds)
        return self.seconds

    def ping(self) -> bool:
        return True

    def boom(self) -> None:
        raise ValueError("boom")

    def take(self, value: float) -> float:
        return value


def test_group_deadline_names_the_hung_actor(cluster):
    with ActorGroup(
        Sleeper, [(0.0,), (60.0,)], cpus=1, gpus=0, timeout_key="k", role="stage"
    ) as group:
        group.gather([(i, group.actors[i].ping.remote()) for i in range(2)], timeout_s=60, key="k")
        refs = [(i, group.actors[i].work.remote()) for i in range(2)]
        t0 = time.monotonic()
        with pytest.raises(ActorTimeout) as info:
            group.gather(refs, timeout_s=2.0, key="pipeline.step_timeout_s", what="work")
        assert time.monotonic() - t0 < 10
        assert info.value.index == 1 and "pipeline.step_timeout_s" in str(info.value)
        assert str(info.value).startswith("stage 1: work still running")
    assert _dead_sleeper(group)


def _dead_sleeper(group: ActorGroup) -> bool:
    try:
        ray.get(group.actors[0].work.remote(), timeout=30)
    except RayActorError:
        return True
    return False


def test_a_call_failing_with_another_actors_death_names_the_dead_one(cluster):
    """Actor 0's call takes actor 1's result; actor 1 is gone, so the call fails with its death
    (Ray fails a call whose argument failed): the error names actor 1, not the caller."""
    with ActorGroup(Sleeper, [(0.0,), (0.0,)], cpus=1, gpus=0, timeout_key="k") as group:
        ray.kill(group.actors[1], no_restart=True)
        with pytest.raises(ActorDied) as info:
            relayed = group.actors[0].take.remote(group.actors[1].work.remote())
            group.gather([(0, relayed)], timeout_s=30, key="k")
        assert info.value.index == 1 and str(info.value).startswith("actor 1: ")


def test_a_call_failing_while_a_peer_is_dead_names_the_dead_peer(cluster):
    """Actors that message each other fail when a peer dies, often before Ray reports the death
    (a p2p stage's receive gets 'connection reset'): the error is the peer's death, which a
    run recovers from, with the caller's failure kept in its text."""
    with ActorGroup(Sleeper, [(0.0,), (0.0,)], cpus=1, gpus=0, timeout_key="k") as group:
        ray.kill(group.actors[1], no_restart=True)
        assert _wait_dead(group, 1)
        with pytest.raises(ActorDied) as info:
            group.gather([(0, group.actors[0].boom.remote())], timeout_s=30, key="k")
        assert info.value.index == 1 and "actor 0 failed meanwhile: ValueError: boom" in str(
            info.value
        )


def _wait_dead(group: ActorGroup, i: int) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if i in group.dead():
            return True
        time.sleep(0.2)
    return False


def test_group_errors_keep_index_and_cause(cluster):
    with ActorGroup(Sleeper, [(0.0,), (0.0,)], cpus=1, gpus=0, timeout_key="k") as group:
        with pytest.raises(ActorError) as info:
            group.gather(
                [(0, group.actors[0].work.remote()), (1, group.actors[1].boom.remote())],
                timeout_s=30,
                key="k",
            )
        assert info.value.index == 1 and "ValueError: boom" in str(info.value)
        ray.kill(group.actors[0])  # takes effect asynchronously: a call may still slip through
        deadline = time.monotonic() + 30
        with pytest.raises(ActorDied) as died:
            while time.monotonic() < deadline:
                group.gather([(0, group.actors[0].work.remote())], timeout_s=30, key="k")
                time.sleep(0.2)
        assert died.value.index == 0


def test_placement_that_cannot_fit_fails_within_its_deadline(cluster):
    """A cluster that may grow is waited for, up to the deadline, whose key the error names."""
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="pipeline.placement_timeout_s"):
        ActorGroup(
            Sleeper,
            [(0.0,)] * 3,
            cpus=3,
            gpus=0,
            placement_timeout_s=2.0,
            timeout_key="pipeline.placement_timeout_s",
            fixed_size=False,
        )
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("fixed_size", [True, None], ids=["said", "asked"])
def test_placement_that_can_never_fit_a_fixed_cluster_fails_at_once(cluster, fixed_size):
    """The local test cluster (4 CPUs, no autoscaler) can never hold 3 x 3 CPUs: no wait for
    the 120 s deadline, and one line saying why and what to change."""
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        ActorGroup(
            Sleeper,
            [(0.0,)] * 3,
            cpus=3,
            gpus=0,
            placement_timeout_s=120.0,
            timeout_key="pipeline.placement_timeout_s",
            fixed_size=fixed_size,
            role="stage",
        )
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "9 CPU asked for, the cluster has 4" in msg and "cannot grow" in msg
    assert "lower the per-stage resources or the number of stages" in msg and "\n" not in msg
    # and what fits is still placed (the check refuses only what never fits)
    with ActorGroup(
        Sleeper, [(0.0,)] * 2, cpus=1, gpus=0, timeout_key="k", fixed_size=fixed_size
    ) as group:
        assert group.gather([(0, group.actors[0].ping.remote())], timeout_s=60, key="k") == [True]


@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_gloo_direct_transport_trains_the_same_weights(cluster, schedule):
    """Activations sent stage to stage by Ray Direct Transport over gloo: the same numbers as
    through the object store (float64, K = 3)."""
    base = _base(RuleConfig(name="rec_lra", kp_init="kaiming", head_init="kaiming"))
    specs = stage_specs(base, [0, 1, 3, 5])
    out = {}
    for transport in ("object_store", "gloo"):
        cfg = PipelineConfig(stages=3, micro_batches=3, schedule=schedule, transport=transport)
        pipe = RayPipeline(specs, cfg)
        sent = _record_transports(pipe.stages)
        try:
            assert pipe.transport == transport
            for x, y in _batches(3):
                pipe.step(x.double(), y, 3)
            pipe.flush()
            out[transport] = pipe.state_dict()["units"]
        finally:
            pipe.close()
        # how each result really travelled: stage 0 and 1's activations, and stage 1's boundary
        # (chained: only stage 0 takes it) by gloo; stage 0's learn (the driver waits on it) not
        direct = "GLOO" if transport == "gloo" else None
        assert sent["forward", 0] == sent["forward", 1] == {direct}
        assert sent["learn", 1] == {direct} and sent["learn", 0] == {None}


def _record_transports(stages) -> dict:
    """(call, stage) -> the set of transports its results were sent by (ObjectRef's own
    record), observed by wrapping the real handle's methods."""
    sent: dict = {}
    for name in ("forward", "learn"):
        call = getattr(stages, name)

        def spy(i, *args, _call=call, _name=name, **kw):
            ref = _call(i, *args, **kw)
            sent.setdefault((_name, i), set()).add(ref.tensor_transport())
            return ref

        setattr(stages, name, spy)
    return sent
