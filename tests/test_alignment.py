"""The error synapses' rate, the exact-transport limit, and the alignment diagnostics.

(a) gamma is the error synapses' own learning rate: the move of E scales with gamma under AdamW
    and SGD alike (Adam's per-tensor normalisation must not erase it), and W's move does not.
(b) With E = W (what KP converges to) and beta -> 0, the rec-LRA `mirror` update of every layer
    equals backprop's gradient: carry_bn and rescale_error are what make it exact, and the test
    shows each is needed.
(c) The backprop probe of diagnostics: exactly 1 for the backprop rule, never touches .grad or
    BatchNorm's running stats, and works across in-process stages.
(d) Synapse angles: 0 for E = W, about 90 at a random start, absent for rules without synapses.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from workers.chain import LocalRunner, stage_specs
from workers.diagnostics import BackpropProbe, frozen_bn_stats, synapse_angles
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

K, B, SHAPE = 4, 8, (2, 8, 8)
MODEL = ModelConfig(name="resnet8", width=4, batchnorm=True)


def _spec(rule: RuleConfig, optim: OptimConfig, **kw) -> StageSpec:  # noqa: ANN003
    n = len(model_plan(MODEL, SHAPE, K))
    return StageSpec(
        model=MODEL,
        rule=rule,
        optim=optim,
        input_shape=SHAPE,
        num_classes=K,
        blocks=(0, n),
        dtype="float64",
        **kw,
    )


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (B,), generator=g)


def _learn(stage: Stage, x: torch.Tensor, y: torch.Tensor) -> None:
    stage.forward(0, x)
    stage.learn(0, ErrorSignal(labels=y))


def _feedback_moves(gamma: float, optim: OptimConfig) -> tuple[float, float]:
    """(|move of all E|, |move of all W|) in one step (later steps differ anyway: the errors
    that W learns from are carried by E)."""
    rule = RuleConfig(
        name="rec_lra", gamma=gamma, kp_init="kaiming", head_init="kaiming", mirror_angle=0.0
    )
    stage = Stage(_spec(rule, optim))
    units = stage.units()
    before = {
        k: (u.feedback.detach().clone(), u.weight.detach().clone())
        for k, u in units.items()
        if getattr(u, "feedback", None) is not None
    }
    _learn(stage, *_batch(0))
    stage.apply()
    with torch.no_grad():
        de = sum(float((units[k].feedback - e0).norm() ** 2) for k, (e0, _) in before.items())
        dw = sum(float((units[k].weight - w0).norm() ** 2) for k, (_, w0) in before.items())
    return de**0.5, dw**0.5


@pytest.mark.parametrize(
    "optim",
    [
        OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0),
        OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0),
    ],
    ids=["adamw", "sgd"],
)
def test_gamma_scales_the_move_of_the_error_synapses(optim):
    de_small, dw_small = _feedback_moves(0.15, optim)
    de_one, dw_one = _feedback_moves(1.0, optim)
    assert de_one > 0 and dw_one > 0
    assert de_small / de_one == pytest.approx(0.15, rel=1e-6)
    assert dw_small == pytest.approx(dw_one, rel=1e-9)  # W learns the same whatever gamma


def test_kp_decay_matches_the_forward_weights_so_E_converges_to_gamma_W():
    """KP with weight decay: E - gamma*W shrinks by W's decay factor every step."""
    gamma, wd, lr = 0.5, 0.3, 1e-2
    rule = RuleConfig(
        name="rec_lra", gamma=gamma, kp_init="kaiming", head_init="kaiming", mirror_angle=0.0
    )
    stage = Stage(
        _spec(rule, OptimConfig(name="adamw", lr=lr, weight_decay=wd, schedule="constant"))
    )
    layer = stage.units()["layer1.0.conv2"]
    gap0 = (layer.feedback - gamma * layer.weight).detach().clone()
    for seed in range(3):
        _learn(stage, *_batch(seed))
        stage.apply()
    gap = (layer.feedback - gamma * layer.weight).detach()
    torch.testing.assert_close(gap, gap0 * (1 - lr * wd) ** 3, rtol=1e-6, atol=1e-9)


def _tied_stage(**rule_kw) -> Stage:  # noqa: ANN003
    """A rec-LRA mirror stage whose error synapses equal their forward weights."""
    rule = RuleConfig(
        name="rec_lra",
        topology="mirror",
        beta=1e-7,
        head_init="kaiming",
        mirror_angle=0.0,
        **rule_kw,
    )
    stage = Stage(_spec(rule, OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0)))
    with torch.no_grad():
        for unit in stage.units().values():
            if getattr(unit, "feedback", None) is not None:
                unit.feedback.copy_(unit.weight)
    return stage


def _cosines_against_backprop(stage: Stage) -> dict[str, float]:
    x, y = _batch(3)
    probe = BackpropProbe(stage.block_list)
    probe.run(x, labels=y, grad_out=None, needs_input_grad=False)
    _learn(stage, x, y)
    return probe.cosines()


def test_with_exact_transport_mirror_rec_lra_is_backprop():
    cos = _cosines_against_backprop(_tied_stage(carry_bn=True, rescale_error=True))
    assert len(cos) == 10  # stem, 3 blocks (2 convs each, 2 projection shortcuts), head
    assert min(cos.values()) > 1 - 1e-6, cos


@pytest.mark.parametrize(
    "knobs", [dict(carry_bn=False, rescale_error=True), dict(carry_bn=True, rescale_error=False)]
)
def test_without_either_fix_exact_transport_is_not_backprop(knobs):
    cos = _cosines_against_backprop(_tied_stage(**knobs))
    assert min(cos.values()) < 0.99, cos  # some layer below the head drifts off the gradient


def test_probe_is_exactly_backprop_for_the_backprop_rule_and_learns_nothing():
    rule = RuleConfig(name="backprop", head_init="kaiming")
    stage = Stage(_spec(rule, OptimConfig(name="sgd", lr=0.1, momentum=0.0), diagnose_every=1))
    x, y = _batch(1)
    bn = stage.units()["layer2.0.conv1"].bn
    running = bn.running_mean.clone()
    stage.forward(0, x)
    stage.learn(0, ErrorSignal(labels=y))
    after_learn = {n: p.grad.clone() for n, p in stage._named_params if p.grad is not None}
    torch.testing.assert_close(bn.running_mean, running * 0.9 + 0.1 * _batch_mean(stage, x))
    stage.apply()
    cos = stage.stats.backprop_cosine
    assert set(cos) == {n for n in stage.units() if "skip" not in n}
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in cos.values()), cos
    assert after_learn  # the probe ran after learn had filled .grad, and left it alone:
    fresh = Stage(_spec(rule, OptimConfig(name="sgd", lr=0.1, momentum=0.0)))
    fresh.forward(0, x)
    fresh.learn(0, ErrorSignal(labels=y))
    for n, p in fresh._named_params:
        if p.grad is not None:
            torch.testing.assert_close(after_learn[n], p.grad, rtol=0, atol=0)


def _batch_mean(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    """The batch mean at layer2.0.conv1's BN input, from a fresh forward with the start weights."""
    fresh = Stage(replace(stage.spec, diagnose_every=0))
    out = x
    for block in fresh.block_list[:2]:
        out = block(out)
    lin = fresh.units()["layer2.0.conv1"].linear(out, fresh.units()["layer2.0.conv1"].weight)
    return lin.mean(dim=(0, 2, 3)).detach()


def test_frozen_bn_stats_restores_running_stats():
    stage = Stage(_spec(RuleConfig(), OptimConfig()))
    bn = stage.units()["stem.conv"].bn
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with frozen_bn_stats(stage.block_list):
        stage.block_list[0](_batch()[0])
        assert not torch.equal(bn.running_mean, before[0])  # the forward did move them
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


@pytest.mark.parametrize("bounds", [[0, 2, 5], [0, 1, 3, 5]], ids=["k2", "k3"])
def test_probe_chains_across_stages_like_one_stage(bounds):
    """The probe's true gradient crosses stage boundaries: K stages report the cosines of one."""
    rule = RuleConfig(name="rec_lra", topology="skip", kp_init="kaiming", head_init="kaiming")
    base = _spec(rule, OptimConfig(name="sgd", lr=0.05, momentum=0.0), diagnose_every=1)
    one = LocalRunner([base])
    many = LocalRunner(stage_specs(base, bounds))
    x, y = _batch(5)
    one.step(x, y, 2)
    many.step(x, y, 2)
    expect = one.stages[0].stats.backprop_cosine
    got: dict[str, float] = {}
    for stage in many.stages:
        got.update(stage.stats.backprop_cosine)
    assert set(got) == set(expect) and len(expect) == 10
    for name, v in expect.items():
        assert got[name] == pytest.approx(v, abs=1e-9), name


def test_probe_runs_only_every_n_steps():
    base = _spec(RuleConfig(), OptimConfig(name="sgd", lr=0.05, momentum=0.0), diagnose_every=3)
    runner = LocalRunner([base])
    seen = []
    for step in range(6):
        runner.step(*_batch(step), 1)
        seen.append(bool(runner.drain_stats()[0][1].backprop_cosine))
    assert seen == [True, False, False, True, False, False]


def test_synapse_angles():
    tied = _tied_stage()
    assert all(a == pytest.approx(0.0, abs=1e-5) for a in synapse_angles(tied.block_list).values())
    rand = Stage(_spec(RuleConfig(kp_init="kaiming", head_init="kaiming"), OptimConfig()))
    angles = synapse_angles(rand.block_list)
    assert len(angles) == 9  # every layer but the stem, which sends nothing below the data
    assert all(60 < a < 120 for a in angles.values()), angles
    bp = Stage(_spec(RuleConfig(name="backprop"), OptimConfig()))
    assert synapse_angles(bp.block_list) == {}
