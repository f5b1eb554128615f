"""The pipeline's stream in this process (LocalPipeline), async optimizer steps, the lr schedule.

(a) The in-process stream runs the same ops in the same order per stage as Ray does, so its
    async training equals the Ray pipeline's to the last bit (float64), K = 2 and 3.
(b) In sync it equals the plain in-process runner (LocalRunner).
(c) Async steps the optimizer once per `apply_every` learns; flush() applies what is left, and
    the learning-rate schedule advances by training steps, not by optimizer steps (the async
    schedule used to run through its whole cosine in 1/M of the run with M micro-batches).
(d) Async works under SGD as under AdamW (an in-place step must not void the cached graphs of
    micro-batches still in flight).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import ray
import torch

from driver.config.pipeline import PipelineConfig
from driver.pipeline.stream import LocalPipeline, RayPipeline
from workers.chain import LocalRunner, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig, lr_factor
from workers.rules import RuleConfig
from workers.spec import StageSpec

MODEL = ModelConfig(name="resnet8", width=4)
SHAPE = (1, 8, 8)
RANDOM = dict(kp_init="kaiming", head_init="kaiming")


def _base(rule: RuleConfig, optim: OptimConfig | None = None) -> StageSpec:
    n = len(model_plan(MODEL, SHAPE, 10))
    return StageSpec(
        model=MODEL,
        rule=rule,
        optim=optim or OptimConfig(total_steps=20),
        input_shape=SHAPE,
        num_classes=10,
        blocks=(0, n),
        dtype="float64",
    )


def _batches(n: int, size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(size, *SHAPE, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (size,), generator=g),
        )
        for _ in range(n)
    ]


def _train(runner, steps: int, m: int) -> None:  # noqa: ANN001
    for x, y in _batches(steps):
        runner.step(x, y, m)
    runner.flush()


def _units(runner) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {
        f"{u}.{k}": t
        for u, entry in runner.state_dict()["units"].items()
        for k, t in entry["tensors"].items()
    }


def _assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.ray
@pytest.mark.parametrize(
    "rule, bounds",
    [
        (RuleConfig(name="rec_lra", **RANDOM), [0, 2, 5]),
        (RuleConfig(name="rec_lra", topology="skip", **RANDOM), [0, 1, 3, 5]),
        (RuleConfig(name="backprop"), [0, 3, 5]),
        (RuleConfig(name="rec_lra", topology="decoupled", **RANDOM), [0, 1, 3, 5]),
    ],
    ids=["mirror-k2", "skip-k3", "backprop-k2", "decoupled-k3"],
)
def test_in_process_async_equals_ray_async_bitwise(rule, bounds):
    cfg = PipelineConfig(
        stages=len(bounds) - 1, schedule="async", micro_batches=3, apply_every=2, max_in_flight=2
    )
    specs = stage_specs(_base(rule), bounds)
    local = LocalPipeline(specs, cfg)
    _train(local, 4, 3)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reclra-tests-local")
    try:
        remote = RayPipeline(specs, cfg)
        try:
            _train(remote, 4, 3)
            _assert_same(_units(local), _units(remote))
        finally:
            remote.close()
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    "rule",
    [RuleConfig(**RANDOM), RuleConfig(name="backprop"), RuleConfig(topology="decoupled", **RANDOM)],
    ids=["mirror", "backprop", "decoupled"],
)
def test_in_process_sync_stream_equals_the_plain_runner(rule):
    specs = stage_specs(_base(rule), [0, 2, 5])
    plain = LocalRunner(specs)
    stream = LocalPipeline(specs, PipelineConfig(stages=2, micro_batches=3))
    for x, y in _batches(3):
        plain.step(x, y, 3)
        stream.step(x, y, 3)
    _assert_same(_units(plain), _units(stream), tol=1e-12)


@pytest.mark.parametrize("apply_every, expect_steps", [(1, 18), (3, 6), (2, 9)])
def test_async_optimizer_steps_and_schedule_follow_training_steps(apply_every, expect_steps):
    cfg = PipelineConfig(stages=2, schedule="async", micro_batches=3, apply_every=apply_every)
    pipe = LocalPipeline(stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5]), cfg)
    _train(pipe, 6, 3)
    for stage in pipe.stages.stages:  # type: ignore[union-attr]
        assert stage.step == expect_steps  # optimizer steps
        assert stage.progress == pytest.approx(6.0)  # training steps: 6 batches of 3
        assert stage._learns == 0 and all(p.grad is None for _, p in stage._named_params)


def test_async_schedule_ends_where_the_run_ends():
    """With a 6-step cosine, the last optimizer step of an async run with 3 micro-batches runs
    near the end of the schedule, not at lr 0 for the last two thirds of the run."""
    optim = OptimConfig(lr=0.01, total_steps=6)
    cfg = PipelineConfig(stages=2, schedule="async", micro_batches=3, apply_every=1)
    pipe = LocalPipeline(stage_specs(_base(RuleConfig(**RANDOM), optim), [0, 2, 5]), cfg)
    lrs = []
    stage0 = pipe.stages.stages[0]  # type: ignore[union-attr]
    for x, y in _batches(6):
        pipe.step(x, y, 3)
        lrs.append(stage0.optimizer.param_groups[0]["lr"])
    pipe.flush()
    assert lrs[2] > 0.5 * 0.01  # halfway through the run: still about half the peak rate
    assert 0 < lrs[-1] < 0.01 * lr_factor(optim, 4.0)  # near the end, not at zero long before


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_async_steps_in_place_under_either_optimizer(optim):
    base = _base(RuleConfig(**RANDOM), OptimConfig(name=optim, lr=0.01))
    cfg = PipelineConfig(stages=2, schedule="async", micro_batches=4, apply_every=1)
    pipe = LocalPipeline(stage_specs(base, [0, 2, 5]), cfg)
    before = _units(pipe)
    _train(pipe, 3, 4)  # stage 0 holds 2 micro-batches while it steps: their graphs must live
    after = _units(pipe)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_apply_every_must_not_be_negative():
    with pytest.raises(ValueError, match="pipeline.apply_every"):
        PipelineConfig(apply_every=-1)


def test_flush_applies_a_partial_accumulation():
    cfg = PipelineConfig(stages=2, schedule="async", micro_batches=2, apply_every=4)
    pipe = LocalPipeline(stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5]), cfg)
    for x, y in _batches(3):  # 6 learns per stage: one step of 4, then 2 pending
        pipe.step(x, y, 2)
    pipe.flush()
    for stage in pipe.stages.stages:  # type: ignore[union-attr]
        assert stage.step == 2 and stage.progress == pytest.approx(3.0)


def test_resume_keeps_the_schedule_position():
    cfg = PipelineConfig(stages=2, schedule="async", micro_batches=3)
    specs = stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5])
    pipe = LocalPipeline(specs, cfg)
    _train(pipe, 2, 3)
    again = LocalPipeline([replace(s, seed=9) for s in specs], cfg)
    again.load_state_dict(pipe.state_dict())
    for a, b in zip(pipe.stages.stages, again.stages.stages, strict=True):  # type: ignore[union-attr]
        assert (a.step, a.progress) == (b.step, b.progress)


def test_flush_after_sync_steps_takes_no_optimizer_step():
    """An epoch ends with flush(); in sync every step already applied, and an empty stream must
    not step the optimizer again (it used to, once an epoch, moving the lr schedule)."""
    pipe = LocalPipeline(
        stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5]), PipelineConfig(stages=2)
    )
    for x, y in _batches(3):
        pipe.step(x, y, 1)
    before = _units(pipe)
    pipe.flush()
    pipe.flush()
    for stage in pipe.stages.stages:  # type: ignore[union-attr]
        assert stage.step == 3 and stage.progress == 3.0
    _assert_same(before, _units(pipe))


def calls_per_step(pipe: LocalPipeline, steps: int, m: int) -> list[int]:
    """The stage calls the driver has made after each of `steps` steps of `m` micro-batches
    (counted on the real in-process handle)."""
    calls = {"n": 0}
    for name in ("forward", "forward_learn", "learn", "apply", "pop_stats"):
        call = getattr(pipe.stages, name)

        def counted(*args, _call=call, **kw):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            return _call(*args, **kw)

        setattr(pipe.stages, name, counted)
    counts = []
    for x, y in _batches(steps, size=8):
        pipe.step(x, y, m)
        counts.append(calls["n"])
    return counts


@pytest.mark.parametrize("schedule", ["sync", "async"])
@pytest.mark.parametrize("k, bounds", [(2, [0, 2, 5]), (3, [0, 1, 3, 5])])
def test_the_driver_makes_the_calls_the_scaling_model_charges(schedule, k, bounds):
    """bench.scaling charges the driver per actor call, counted by calls_per_micro_batch; the
    stream must make exactly that many (counted on the real in-process handle)."""
    from driver.pipeline.stage_count import calls_per_micro_batch

    m, steps = 4, 3
    cfg = PipelineConfig(stages=k, schedule=schedule, micro_batches=m)
    pipe = LocalPipeline(stage_specs(_base(RuleConfig(**RANDOM)), bounds), cfg)
    counts = calls_per_step(pipe, steps, m)
    # per step in the steady state (async: the stream runs on across steps, so the first
    # step submits fewer ops and later steps finish the previous step's)
    per_step = calls_per_micro_batch(k, m, sync=schedule == "sync") * m
    assert counts[-1] - counts[0] == per_step * (steps - 1)
