"""The p2p engine (driver/pipeline/p2p.py): stages that run their own op order and exchange
tensors by torch.distributed (gloo here), on a real local Ray cluster."""

from __future__ import annotations

import pytest
import ray
import torch
from test_pipeline_local import (  # the same tiny float64 model
    RANDOM,
    _assert_same,
    _base,
    _batches,
    _units,
)

from cluster.errors import ActorError
from driver.config.pipeline import PipelineConfig
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.stream import LocalPipeline
from workers.chain import LocalRunner, stage_specs
from workers.rules import RuleConfig


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "rule, bounds",
    [
        (RuleConfig(**RANDOM), [0, 2, 5]),  # mirror: chained
        (RuleConfig(**RANDOM), [0, 1, 3, 5]),
        (RuleConfig(topology="skip", **RANDOM), [0, 1, 3, 5]),  # e_L broadcast from the top
        (RuleConfig(name="backprop"), [0, 1, 3, 5]),
        (RuleConfig(topology="decoupled", **RANDOM), [0, 1, 3, 5]),  # each stage from its head
    ],
    ids=["mirror-k2", "mirror-k3", "skip-k3", "backprop-k3", "decoupled-k3"],
)
def test_p2p_sync_trains_the_weights_one_process_does(cluster, rule, bounds):
    specs = stage_specs(_base(rule), bounds)
    k = len(bounds) - 1
    plain = LocalRunner(specs)
    pipe = P2PPipeline(specs, PipelineConfig(stages=k, micro_batches=3))
    try:
        for x, y in _batches(3):
            ((want, _),) = plain.step(x, y, 3)
            ((got, labels),) = pipe.step(x, y, 3)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
            assert torch.equal(labels, y)
        stats = pipe.drain_stats()
        assert [s for s, _ in stats] == list(range(k)) * 3  # each stage's stats, every step
        assert all(st.micro_batches == 3 for _, st in stats)
        got_state, want_state = pipe.state_dict()["units"], plain.state_dict()["units"]
        assert got_state.keys() == want_state.keys()
        for name in want_state:
            for key, t in want_state[name]["tensors"].items():
                torch.testing.assert_close(got_state[name]["tensors"][key], t, rtol=0, atol=1e-12)
        x, _ = _batches(1, size=5)[0]
        torch.testing.assert_close(pipe.infer(x), plain.infer(x), rtol=0, atol=1e-12)
    finally:
        pipe.close()


@pytest.mark.parametrize(
    "rule, bounds, window, apply_every",
    [
        (RuleConfig(**RANDOM), [0, 2, 5], 0, 1),  # mirror: chained
        (RuleConfig(topology="skip", **RANDOM), [0, 1, 3, 5], 0, 2),  # e_L broadcast
        (RuleConfig(**RANDOM), [0, 1, 3, 5], 5, 1),  # a window past K: the top runs ahead too
        (RuleConfig(name="backprop"), [0, 3, 5], 2, 0),  # one optimizer step per training step
    ],
    ids=["mirror-k2", "skip-k3", "mirror-k3-window5", "backprop-k2"],
)
def test_p2p_async_equals_the_stream_engines_async(cluster, rule, bounds, window, apply_every):
    """Async on p2p runs each stage's ops in the stream engine's order, so it trains the same
    weights (float64, to the last bit) and computes the same logits: the stream runs on across
    steps until flush(), and a step returns the logits of the step before (its calls queue
    behind that one's), a flush all the rest."""
    k = len(bounds) - 1
    cfg = PipelineConfig(
        stages=k,
        schedule="async",
        micro_batches=3,
        apply_every=apply_every,
        max_in_flight=window,
        engine="p2p",
    )
    specs = stage_specs(_base(rule), bounds)
    stream = LocalPipeline(specs, cfg)
    pipe = P2PPipeline(specs, cfg)
    try:
        want: list = []
        got: list = []
        for batch in [*_batches(4), None, *_batches(2), None]:  # None: a flush
            want += stream.flush() if batch is None else stream.step(*batch, 3)
            got += pipe.flush() if batch is None else pipe.step(*batch, 3)
            if batch is None:  # everything fed is finished: the same logits and labels
                for i in (0, 1):
                    assert torch.equal(
                        torch.cat([g[i] for g in got]), torch.cat([w[i] for w in want])
                    )
        stream.flush()
        pipe.flush()
        _assert_same(_units(stream), _units(pipe))

        # the same staleness per stage (applies between a forward and its learn): async ran
        def stale(reports: list) -> list[list[int]]:
            return [sum((st.staleness for s, st in reports if s == i), []) for i in range(k)]

        want_stale = stale(stream.drain_stats(wait=True))
        assert stale(pipe.drain_stats()) == want_stale and any(map(any, want_stale))
    finally:
        pipe.close()


def _assert_same_state(got, want, path: str = "") -> None:  # noqa: ANN001
    """Two nested states equal: tensors to the bit, everything else by ==."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _assert_same_state(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_state(g, w, f"{path}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), path
    else:
        assert got == want, path


def test_an_async_p2p_checkpoint_is_cut_in_flow_as_the_stream_engines(cluster):
    """A checkpoint of an open async p2p stream (the run's take_snapshot) does not drain it:
    each stage takes its state at the cut's point of its own op order, in a later call. The
    states equal the stream engine's cut, bit for bit (input noise on: its RNG is part of the
    forward-side state), and training goes on exactly as there."""
    from driver.run.checkpointing import take_snapshot
    from workers.state import merge_states

    cfg = PipelineConfig(stages=3, schedule="async", micro_batches=3, engine="p2p")
    rule = RuleConfig(topology="skip", input_noise=0.05, **RANDOM)
    specs = stage_specs(_base(rule), [0, 1, 3, 5])
    stream = LocalPipeline(specs, cfg)
    pipe = P2PPipeline(specs, cfg)
    try:
        cuts = []
        for i, (x, y) in enumerate(_batches(6)):
            stream.step(x, y, 3)
            pipe.step(x, y, 3)
            if i in (1, 3):
                want, drained = take_snapshot(stream, drain=False)
                got, p2p_drained = take_snapshot(pipe, drain=False)
                assert drained == p2p_drained == []  # no flush
                assert not got.complete and pipe.cut_pending  # stage 0 has learns to go
                cuts.append((want, got))
        stream.flush()
        pipe.flush()
        for want, got in cuts:
            assert got.complete and not pipe.cut_pending
            _assert_same_state(merge_states(got.collect()), merge_states(want.collect()))
        _assert_same(_units(stream), _units(pipe))
        got, _ = take_snapshot(pipe, drain=False)  # an empty stream: taken at once
        assert got.complete
        _assert_same_state(merge_states(got.collect()), pipe.state_dict())
    finally:
        pipe.close()


def test_p2p_state_round_trip_continues_the_same_training(cluster):
    """load_state_dict of one pipeline's state into a fresh one: the next step is the same."""
    specs = stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5])
    cfg = PipelineConfig(stages=2, micro_batches=2)
    (x1, y1), (x2, y2) = _batches(2)
    a = P2PPipeline(specs, cfg)
    try:
        a.step(x1, y1, 2)
        state = a.state_dict()
        ((want, _),) = a.step(x2, y2, 2)
    finally:
        a.close()
    b = P2PPipeline(specs, cfg)
    try:
        b.load_state_dict(state)
        ((got, _),) = b.step(x2, y2, 2)
    finally:
        b.close()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_a_failing_p2p_stage_fails_the_step_naming_it(cluster, schedule):
    """Stage 0 refuses a non-finite update; the step fails with its error (the stage above,
    waiting on messages, is killed with the group), well within the step deadline. Async: a
    step's calls are gathered at the next step or the flush, which fails then."""
    import time

    specs = stage_specs(_base(RuleConfig(**RANDOM)), [0, 2, 5])
    cfg = PipelineConfig(stages=2, micro_batches=2, step_timeout_s=60, schedule=schedule)
    pipe = P2PPipeline(specs, cfg)
    x, y = _batches(1)[0]
    x[0, 0, 0, 0] = float("nan")
    t0 = time.monotonic()
    with pytest.raises(ActorError) as info:
        pipe.step(x, y, 2)
        pipe.flush()
    assert time.monotonic() - t0 < 30
    assert "non-finite" in str(info.value) and str(info.value).startswith("stage ")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"transport": "object_store"}, "the p2p engine sends by gloo or nccl"),
        ({"transport": "nccl"}, 'nccl needs train.device = "cuda"'),
        ({"transport": "nccl", "gpus_per_stage": 0.5}, "nccl needs a whole GPU per stage"),
    ],
)
def test_p2p_refuses_what_it_cannot_run_in_one_line(overrides, message):
    from driver.pipeline.p2p import p2p_backend

    cuda = "gpus_per_stage" in overrides
    with pytest.raises(ValueError) as info:
        p2p_backend(PipelineConfig(stages=2, engine="p2p", **overrides), cuda=cuda)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "gpus, cuda, backend",
    [(-1, True, "nccl"), (1.0, True, "nccl"), (0.5, True, "gloo"), (-1, False, "gloo")],
)
def test_p2p_auto_transport_is_nccl_only_with_a_whole_gpu_per_stage(gpus, cuda, backend):
    """Stages sharing a GPU cannot use NCCL (one rank per device): they send by gloo."""
    from driver.pipeline.p2p import p2p_backend

    assert p2p_backend(PipelineConfig(stages=2, gpus_per_stage=gpus), cuda=cuda) == backend


def test_a_p2p_run_recovers_a_killed_stage_and_ends_with_one_process_weights(
    cluster, digits, tmp_path
):
    """A served-style run (Controller) on the p2p engine, K = 3: stage 1's process is SIGKILLed
    at step 8; the run recovers from its step-5 checkpoint and ends with the weights one
    process trains (sync float64), over the same 19 steps."""
    import os
    import signal

    from ckpt_helpers import CHAINED, TINY

    from driver.config import load_config
    from driver.run import checkpoint_store
    from driver.run.controller import Controller, RunState
    from driver.run.train import train

    base = [*TINY, CHAINED, "train.checkpoint_every=5", "pipeline.micro_batches=2"]
    ref = train(load_config(None, base), quiet=True, out_dir=tmp_path / "ref", splits=digits)
    cfg = load_config(
        None, [*base, "pipeline.stages=3", "pipeline.boundaries=[1, 3]", 'pipeline.engine="p2p"']
    )
    ctl = Controller(cfg, out_dir=tmp_path / "p2p", splits=digits, run_id="p2p")
    killed = False
    while not ctl.done:
        ctl.step()
        if not killed and ctl.run.steps == 8 and ctl.state is RunState.RUNNING:
            assert type(ctl.runner).__name__ == "P2PPipeline"
            actor = ctl.runner.group.actors[1]  # type: ignore[union-attr]
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed and ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.restarts == 1 and ctl.run.steps == ref.steps == 19
    load = checkpoint_store.load
    want = load(tmp_path / "ref" / "rec_lra" / "checkpoints")["runner"]["units"]
    got = load(tmp_path / "p2p" / "rec_lra" / "checkpoints")["runner"]["units"]
    for name in want:
        for key, t in want[name]["tensors"].items():
            torch.testing.assert_close(got[name]["tensors"][key], t, rtol=1e-10, atol=1e-10)


def test_an_async_p2p_run_trains_what_the_async_stream_trains(cluster, digits, tmp_path):
    """A whole run (train: epochs, flushes at their ends, evaluation, the final checkpoint)
    async on the p2p engine at K = 2 ends with the weights, curves and step count of the same
    run on the stream engine in this process (float64, to the last bit)."""
    from ckpt_helpers import CHAINED, TINY

    from driver.config import load_config
    from driver.run import checkpoint_store
    from driver.run.train import train

    base = [*TINY, CHAINED, "train.epochs=2", 'pipeline.schedule="async"']
    base.append("pipeline.micro_batches=4")
    base += ["pipeline.stages=2", "pipeline.boundaries=[2]", "pipeline.apply_every=2"]
    runs = {}
    for engine, backend in (("stream", "local"), ("p2p", "ray")):
        cfg = load_config(
            None, [*base, f'pipeline.engine="{engine}"', f'pipeline.backend="{backend}"']
        )
        runs[engine] = train(cfg, quiet=True, out_dir=tmp_path / engine, splits=digits)
    assert runs["p2p"].steps == runs["stream"].steps > 20
    for key in ("train_acc", "val_acc", "val_loss"):
        assert [e[key] for e in runs["p2p"].epochs] == [e[key] for e in runs["stream"].epochs]
    # returned in different chunks (a step's here, a micro-batch's there): float64 sums agree
    got_loss = [e["train_loss"] for e in runs["p2p"].epochs]
    assert got_loss == pytest.approx([e["train_loss"] for e in runs["stream"].epochs], rel=1e-12)
    want = checkpoint_store.load(tmp_path / "stream" / "rec_lra" / "checkpoints")["runner"]["units"]
    got = checkpoint_store.load(tmp_path / "p2p" / "rec_lra" / "checkpoints")["runner"]["units"]
    for name in want:
        for key, t in want[name]["tensors"].items():
            assert torch.equal(got[name]["tensors"][key], t), (name, key)


@pytest.mark.parametrize("topology", ["mirror", "skip"])
def test_p2p_carries_backprops_gradient_for_diagnostics(cluster, topology):
    """train.diagnose_every: backprop's gradient goes down the chain beside the signal (a flag
    says when); the weights are still one process's and every stage reports its cosines."""
    from dataclasses import replace

    base = replace(_base(RuleConfig(topology=topology, **RANDOM)), diagnose_every=1)
    specs = stage_specs(base, [0, 1, 3, 5])
    plain = LocalRunner(specs)
    pipe = P2PPipeline(specs, PipelineConfig(stages=3, micro_batches=2))
    try:
        for x, y in _batches(2):
            ((want, _),) = plain.step(x, y, 2)
            ((got, _),) = pipe.step(x, y, 2)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        stats = pipe.drain_stats()
        assert all(st.backprop_cosine for _, st in stats), "a stage got no gradient"
        want_cos = [st.backprop_cosine for _, st in plain.drain_stats()]
        for (_, st), want_s in zip(stats[-3:], want_cos[-3:], strict=True):
            assert st.backprop_cosine == pytest.approx(want_s, abs=1e-9)
    finally:
        pipe.close()
