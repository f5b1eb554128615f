"""Decoupled stages (rule.topology = "decoupled"): each stage below the top learns from an
auxiliary head of its own, the moment its forward is done, and nothing crosses a stage
boundary backwards.

(a) Backprop-free and decoupled: given the same input, a stage's update is bitwise the same
    whatever the weights of every other stage (and under the chained rule it is not).
(b) One stage is the mirror topology; the heads are the rule's own blocks (error synapses,
    weight mirror), of each configured shape, and the reconstruction term reaches the trunk.
(c) The schedule: every stage learns right after its forward (window 1), so async learns are
    never stale, a stage receives only activations, and it holds one micro-batch's cache
    (cached_bytes) where a chained stage holds its whole window.
(d) On Ray, the stream and p2p engines train what the in-process stream trains, to the bit.
(e) A resume on another K: blocks keep their weights, heads at new boundaries start fresh and
    are named in the stats; heads of boundaries that went away are dropped.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_pipeline_local import RANDOM, _assert_same, _base, _batches, _units

from driver.config.pipeline import PipelineConfig
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.schedule import FORWARD, LEARN, Op, dependencies, ticks
from driver.pipeline.stream import LocalPipeline, RayPipeline
from workers.chain import LocalRunner, learns_chained, learns_decoupled, stage_specs
from workers.rules import ErrorSignal, RuleConfig
from workers.stage import Stage

DECOUPLED = RuleConfig(topology="decoupled", **RANDOM)
BOUNDS = [0, 1, 3, 5]  # stem | layer1.0, layer2.0 | layer3.0, head


def _params(stage: Stage) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in stage._named_params}


def _perturb(stage: Stage, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in stage._named_params:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _middle_update(rule: RuleConfig, perturb_others: bool) -> dict[str, torch.Tensor]:
    """Stage 1's weights after one step on a fixed input, with stage 0 and 2 as built or with
    every weight of theirs changed. Stage 1's input is the same either way."""
    specs = stage_specs(_base(rule), BOUNDS)
    stages = [Stage(s) for s in specs]
    if perturb_others:
        _perturb(stages[0], 1)
        _perturb(stages[2], 2)
    ((x, y),) = _batches(1)
    x1 = Stage(specs[0]).forward("ref", x)  # stage 1's input: the unperturbed stage 0's output
    labels = ErrorSignal(labels=y)
    if learns_decoupled(specs[0]):
        stages[0].forward_learn(0, x, labels)
        out, _ = stages[1].forward_learn(0, x1, labels)
        stages[2].forward_learn(0, out, labels)
    else:
        stages[0].forward(0, x)
        out = stages[1].forward(0, x1)
        _, sent = stages[2].forward_learn(0, out, labels)
        sent = stages[1].learn(0, sent)
        stages[0].learn(0, sent)
    for stage in stages:
        stage.apply()
    return _params(stages[1])


def test_a_decoupled_stage_update_does_not_depend_on_any_other_stages_weights():
    same = _middle_update(DECOUPLED, perturb_others=False)
    changed = _middle_update(DECOUPLED, perturb_others=True)
    assert same.keys() == changed.keys() and any(k.startswith("aux.") for k in same)
    for name, t in same.items():
        assert torch.equal(t, changed[name]), name


def test_the_chained_rule_update_does_depend_on_the_stage_above():
    """The contrast that shows the test above can fail: under the mirror topology stage 1
    learns from stage 2's boundary."""
    same = _middle_update(RuleConfig(**RANDOM), perturb_others=False)
    changed = _middle_update(RuleConfig(**RANDOM), perturb_others=True)
    assert any(not torch.equal(t, changed[n]) for n, t in same.items())


def test_decoupled_signals_flow_forward_only():
    spec = _base(DECOUPLED)
    assert learns_decoupled(spec) and not learns_chained(spec)
    assert not learns_chained(replace(spec, diagnose_every=1))  # diagnostics stay at the top
    for s in range(3):
        assert dependencies(Op(LEARN, s, 4), 4, chained=False, decoupled=True) == []
        assert dependencies(Op(FORWARD, s + 1, 4), 4, chained=False, decoupled=True) == [
            Op(FORWARD, s, 4)
        ]


@pytest.mark.parametrize("sync", [True, False])
def test_the_decoupled_schedule_has_no_backward_bubble(sync):
    """Each stage learns a micro-batch right after forwarding it; stage s starts at tick s
    (its input is one forward of the stage below away) and never idles after, so a sync step
    of N micro-batches on K stages ends after 2N + K - 1 ticks (+1 for the apply): only the
    forward fill, no backward bubble."""
    k, n = 4, 6
    rows = ticks(k, n, window=k, chained=False, sync=sync, decoupled=True)
    for s in range(k):
        ops = [row[s] for row in rows]
        start = next(t for t, op in enumerate(ops) if op is not None)
        assert start == s
        busy = [str(op) for op in ops[start:] if op is not None]
        want = [f"{kind}{m}" for m in range(n) for kind in "FL"] + (["A"] if sync else [])
        assert busy == want
        assert None not in ops[start : start + len(want)]
    assert len(rows) == 2 * n + k - 1 + (1 if sync else 0)
    chained = ticks(k, n, window=k, chained=True, sync=sync)
    assert len(rows) < len(chained)


def test_one_decoupled_stage_is_the_mirror_topology():
    a, b = LocalRunner([_base(DECOUPLED)]), LocalRunner([_base(RuleConfig(**RANDOM))])
    for x, y in _batches(2):
        a.step(x, y, 2)
        b.step(x, y, 2)
    _assert_same(_units(a), _units(b))


@pytest.mark.parametrize("head", ["linear", "pointwise", "conv", "conv2"])
def test_every_head_shape_is_learned_by_the_rule_with_error_synapses(head):
    rule = replace(DECOUPLED, aux_head=head, kp_init="zeros", mirror_angle=10.0)
    specs = stage_specs(_base(rule), [0, 2, 5])
    runner = LocalRunner(specs)
    bottom = runner.stages[0]
    assert bottom.aux is not None and runner.stages[1].aux is None  # the top has the model's
    layers = [(b.name, ly) for b in bottom.aux.head for _, ly in b.layer_items()]
    assert len(layers) == {"linear": 1, "pointwise": 2, "conv": 2, "conv2": 3}[head]
    assert all(ly.feedback is not None for _, ly in layers)  # the head carries errors by E
    before = {n: ly.weight.detach().clone() for n, ly in layers}
    for x, y in _batches(2):
        runner.step(x, y, 1)
    for name, ly in layers:
        assert not torch.equal(ly.weight, before[name]), name  # it learns
    assert all(bottom.stats.start_angle[k] < 20 for k in bottom.stats.start_angle)  # mirrored
    exits = [bottom.infer_exit(_batches(1)[0][0])[1]]
    assert exits[0] is not None and exits[0].shape == (12, 10)


def test_the_reconstruction_term_reaches_the_trunk():
    ((x, y),) = _batches(1)

    def trunk_after(recon: float) -> dict[str, torch.Tensor]:
        stage = Stage(stage_specs(_base(replace(DECOUPLED, aux_recon=recon)), [0, 2, 5])[0])
        stage.forward_learn(0, x, ErrorSignal(labels=y))
        stage.apply()
        return {n: t for n, t in _params(stage).items() if not n.startswith("aux.")}

    plain, with_recon = trunk_after(0.0), trunk_after(1.0)
    assert plain.keys() == with_recon.keys()
    assert any(not torch.equal(t, with_recon[n]) for n, t in plain.items())
    stage = Stage(stage_specs(_base(replace(DECOUPLED, aux_recon=1.0)), [0, 2, 5])[0])
    assert any(".rec." in n for n in stage.units())


def test_a_decoupled_stage_without_labels_is_a_clear_error():
    stage = Stage(stage_specs(_base(DECOUPLED), [0, 2, 5])[0])
    stage.forward(0, _batches(1)[0][0])
    with pytest.raises(ValueError, match="decoupled stage needs labels"):
        stage.learn(0, ErrorSignal())


def test_async_decoupled_stages_are_never_stale_and_receive_only_activations():
    cfg = PipelineConfig(stages=3, schedule="async", micro_batches=4, max_in_flight=3)
    pipe = LocalPipeline(stage_specs(_base(DECOUPLED), BOUNDS), cfg)
    chained = LocalPipeline(stage_specs(_base(RuleConfig(**RANDOM)), BOUNDS), cfg)
    ((x, y),) = _batches(1, size=16)
    for runner in (pipe, chained):
        runner.step(x, y, 4)
        runner.step(x, y, 4)
        runner.flush()
    stats = pipe.drain_stats(wait=True)
    assert all(st.staleness == [0] * st.micro_batches for _, st in stats)
    per_stage = {s: sum(st.bytes_received for t, st in stats if t == s) for s in range(3)}
    acts = [Stage(sp).forward(0, x) for sp in stage_specs(_base(DECOUPLED), [0, 1, 5])[:1]]
    assert per_stage[1] == 2 * acts[0].numel() * acts[0].element_size()  # 2 steps' inputs
    # a decoupled stage holds one micro-batch; a chained stage 0 its window of three
    peak = {s: max(st.cached_bytes for t, st in stats if t == s) for s in range(3)}
    peak_chained = {
        s: max(st.cached_bytes for t, st in chained.drain_stats(wait=True) if t == s) for s in (0,)
    }
    held = {}
    for name, rule in (("decoupled", DECOUPLED), ("chained", RuleConfig(**RANDOM))):
        one = Stage(stage_specs(_base(rule), BOUNDS)[0])
        one.forward(0, x[:4].clone())  # a micro-batch owns its memory (batches.py)
        held[name] = one._cached_bytes
    assert peak[0] == held["decoupled"] > 0  # one micro-batch
    assert peak_chained[0] == 3 * held["chained"] > 0  # its window of three


@pytest.mark.ray
@pytest.mark.parametrize("engine", ["stream", "p2p"])
def test_decoupled_async_on_ray_trains_what_the_in_process_stream_trains(cluster, engine):
    cfg = PipelineConfig(stages=3, schedule="async", micro_batches=3, engine=engine)
    specs = stage_specs(_base(DECOUPLED), BOUNDS)
    local = LocalPipeline(specs, cfg)
    remote = (P2PPipeline if engine == "p2p" else RayPipeline)(specs, cfg)
    try:
        for x, y in _batches(3):
            local.step(x, y, 3)
            remote.step(x, y, 3)
        local.flush()
        remote.flush()
        _assert_same(_units(local), _units(remote))
        stats = remote.drain_stats(wait=True)
        assert all(not any(st.staleness) for _, st in stats)
    finally:
        remote.close()


def test_a_resume_on_another_k_keeps_the_blocks_and_starts_new_heads_fresh(caplog):
    three = LocalRunner(stage_specs(_base(DECOUPLED), BOUNDS))
    for x, y in _batches(2):
        three.step(x, y, 1)
    state = three.state_dict()
    assert {"aux.stem.head.fc", "aux.layer2.0.head.fc"} <= state["units"].keys()

    two = LocalRunner(stage_specs(_base(DECOUPLED), [0, 2, 5]))  # cut after layer1.0 instead
    two.load_state_dict(state)
    got = _units(two)
    for name, t in _units(three).items():
        if not name.startswith("aux.") and name in got:
            assert torch.equal(got[name], t), name  # every block keeps its weights
    assert not any(n.startswith(("aux.stem.", "aux.layer2.0.")) for n in got)  # dropped
    stats = two.drain_stats()
    # the new boundary's head, and the synapses of layers no longer at a stage's bottom
    assert stats[0][1].started_fresh == ["aux.layer1.0", "layer1.0.conv1"]
    assert stats[1][1].started_fresh == ["layer3.0.conv1", "layer3.0.shortcut"]
    fresh = Stage(stage_specs(_base(DECOUPLED), [0, 2, 5])[0])
    for unit in ("aux.layer1.0.c0.conv", "aux.layer1.0.head.fc"):
        want = fresh.units()[unit].weight
        assert torch.equal(two.stages[0].units()[unit].weight, want)  # as initialised
    for x, y in _batches(2):  # and it trains on
        two.step(x, y, 1)
    assert two.drain_stats()[0][1].started_fresh == []  # named once


def test_a_decoupled_checkpoint_cut_completes_at_once_and_is_the_drained_state(digits):
    """Every stage learns right after its forward, so at a step's end nothing is in flight: an
    async cut completes without waiting for the next step, and equals a drained pipeline."""
    from ckpt_helpers import CUT, assert_equal, batches, stage_states

    from driver.config import load_config
    from driver.pipeline.build import build_runner

    cfg = load_config(None, [*CUT, "pipeline.stages=3", 'rule.preset="decoupled"'])
    m = cfg.pipeline.micro_batches
    flowing, drained = (build_runner(cfg, digits)[0] for _ in range(2))
    for x, y in batches(cfg, digits, 3):
        for p in (flowing, drained):
            p.step(x, y, m)
    cut = flowing.cut()  # type: ignore[union-attr]
    assert cut.complete
    drained.flush()
    assert_equal(cut.collect(), stage_states(drained))  # type: ignore[arg-type]
    for p in (flowing, drained):
        p.close()


def test_a_run_resumed_on_another_k_names_what_starts_fresh(digits, tmp_path, caplog):
    """Controller end to end: a decoupled run checkpointed at K = 3 resumes at K = 2; the log
    names the head and synapses that start fresh, and the run trains to its end."""
    from ckpt_helpers import TINY

    from driver.config import load_config
    from driver.run.train import train

    def cfg(stages: int, bounds: str, epochs: int):  # noqa: ANN202
        return load_config(
            None,
            [
                *TINY,
                f"train.epochs={epochs}",
                'pipeline.backend="local"',
                f"pipeline.stages={stages}",
                f"pipeline.boundaries={bounds}",
                'rule.preset="decoupled"',
                "train.checkpoint_every=5",
            ],
        )

    first = train(cfg(3, "[1, 3]", 1), quiet=True, out_dir=tmp_path / "k3", splits=digits)
    ckpts = tmp_path / "k3" / "rec_lra_decoupled" / "checkpoints"
    with caplog.at_level("WARNING"):
        again = train(
            cfg(2, "[2]", 2), quiet=True, out_dir=tmp_path / "k2", splits=digits, resume=ckpts
        )
    said = [r.getMessage() for r in caplog.records if "cut elsewhere" in r.getMessage()]
    assert any("aux.layer1.0" in m and "stage 0" in m for m in said), said
    assert len(again.epochs) == 2 and again.steps == 2 * first.steps  # trained on to its end
