"""Weight mirrors: E estimated from a layer's own response to noise, without reading W."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from workers.chain import LocalRunner, stage_specs
from workers.layers import Conv, Dense, PooledHead
from workers.mirror import estimate, mirror, noise_samples
from workers.models import ModelConfig
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1)
    return math.degrees(math.acos(float(cos)))


def _layer(kind: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if kind == "conv3x3":
        layer, src = Conv(3, 5, 3, padding=1), (3, 9, 9)
    elif kind == "conv3x3-stride2":
        layer, src = Conv(4, 6, 3, stride=2, padding=1), (4, 9, 9)
    elif kind == "conv1x1-stride2":
        layer, src = Conv(4, 6, 1, stride=2), (4, 8, 8)
    elif kind == "conv7x7-imagenet-stem":
        layer, src = Conv(3, 4, 7, stride=2, padding=3), (3, 15, 15)
    elif kind == "dense":
        layer, src = Dense(12, 7), (12,)
    else:
        layer, src = PooledHead(6, 4), (6, 5, 5)
    layer.double()
    with torch.no_grad():
        layer.weight.normal_()
    return layer, src


KINDS = ["conv3x3", "conv3x3-stride2", "conv1x1-stride2", "conv7x7-imagenet-stem", "dense", "head"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_estimate_is_w_in_expectation_and_as_close_as_asked(kind):
    """Unbiased: with much noise the estimate converges to W itself, not to a rescaled or
    edge-distorted W (a wrong gain, e.g. forgetting the padded taps, would stall here); and the
    noise drawn for a target angle gives about that angle."""
    layer, src = _layer(kind)
    w = layer.weight.detach()
    gen = torch.Generator().manual_seed(1)
    fine = estimate(layer, src, noise_samples(layer, src, 1.0), gen)
    assert _angle(fine, w) < 1.6, kind
    assert float(fine.norm() / w.norm()) == pytest.approx(1.0, abs=0.03), kind
    for target in (5.0, 15.0):
        got = [_angle(estimate(layer, src, noise_samples(layer, src, target), gen), w)]
        got += [_angle(estimate(layer, src, noise_samples(layer, src, target), gen), w)]
        assert target / 2 < sum(got) / 2 < target * 1.5, (kind, target, got)


@pytest.mark.parametrize("kind", KINDS)
def test_the_estimate_reads_w_only_through_the_layers_own_map(kind):
    """The estimate depends on W only through the layer's input-output map: with the map
    computed from a hidden copy of W and the parameter itself overwritten with garbage, the
    estimate is bitwise the same."""
    layer, src = _layer(kind)
    n = noise_samples(layer, src, 10.0)
    honest = estimate(layer, src, n, torch.Generator().manual_seed(3))
    hidden = layer.weight.detach().clone()
    own_map = layer.linear
    layer.linear = lambda x, _w: own_map(x, hidden)  # the map: unchanged, W not consulted
    with torch.no_grad():
        layer.weight.normal_(mean=5.0, std=9.0)
    blind = estimate(layer, src, n, torch.Generator().manual_seed(3))
    assert torch.equal(honest, blind), kind


def _spec(**rule) -> StageSpec:
    return StageSpec(
        model=ModelConfig(name="resnet8", width=4),
        rule=RuleConfig(**rule),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        input_shape=(1, 10, 10),
        num_classes=10,
        blocks=(0, 5),
        dtype="float64",
    )


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 10, 10, generator=g, dtype=torch.float64), torch.randint(
        0, 10, (16,), generator=g
    )


def _feedback(stages) -> dict[str, torch.Tensor]:
    out = {}
    for st in stages:
        for block in st.blocks:
            for name, layer in block.layer_items():
                if layer.feedback is not None:
                    out[f"{block.name}.{name}"] = layer.feedback.detach().clone()
    return out


def test_a_fresh_stage_starts_aligned_and_reports_it():
    x, y = _data()
    off = Stage(_spec(head_init="kaiming", mirror_angle=0.0))
    on = Stage(_spec(head_init="kaiming", mirror_angle=8.0))
    for st in (off, on):
        st.forward(0, x)
        st.learn(0, ErrorSignal(labels=y))
    stats_off, stats_on = off.pop_stats(), on.pop_stats()
    assert stats_on.start_angle and stats_on.start_angle.keys() == stats_off.start_angle.keys()
    assert all(a < 14 for a in stats_on.start_angle.values()), stats_on.start_angle
    assert all(a > 80 for a in stats_off.start_angle.values())  # KP from zero: nothing yet
    assert stats_on.mirror_seconds > 0 and stats_off.mirror_seconds == 0
    assert on.pop_stats().start_angle == {}  # reported once


def test_the_phase_does_not_depend_on_the_stage_count():
    """Each layer's noise comes from the run's seed and the layer's name, so cutting the model
    into stages gives the same synapses, and K = 2 trains exactly as K = 1."""
    x, y = _data()
    base = _spec(head_init="kaiming", mirror_angle=10.0, mirror_every=2, mirror_rate=0.5)
    one, two = LocalRunner([base]), LocalRunner(stage_specs(base, [0, 2, 5]))
    for _ in range(5):
        one.step(x, y, micro_batches=2)
        two.step(x, y, micro_batches=2)
    a, b = _feedback(one.stages), _feedback(two.stages)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12, msg=k)


def test_a_resumed_stage_keeps_its_checkpointed_synapses():
    x, y = _data()
    spec = _spec(head_init="kaiming", mirror_angle=10.0)
    first = Stage(spec)
    for mb in range(3):
        first.forward(mb, x)
        first.learn(mb, ErrorSignal(labels=y))
        first.apply()
    state = first.state_dict()
    resumed = Stage(spec)
    resumed.load_state_dict(state)
    resumed.forward(9, x)  # no mirror phase: the checkpoint's E stays
    assert resumed.stats.mirror_seconds == 0
    for k, v in _feedback([first]).items():
        assert torch.equal(v, _feedback([resumed])[k]), k


def test_interleaved_mirror_steps_pull_a_drifting_synapse_back():
    """With `local` synapses (which drift from W), mirror steps every other step keep E near W;
    without them the angles grow."""
    x, y = _data()
    common = dict(head_init="kaiming", feedback_update="local", kp_init="kaiming")
    runs = {
        every: LocalRunner([_spec(**common, mirror_angle=5.0, mirror_every=every)])
        for every in (0, 2)
    }
    for _ in range(10):
        for runner in runs.values():
            runner.step(x, y)
    angles = {k: r.stages[0].pop_stats().synapse_angle for k, r in runs.items()}
    assert max(angles[2].values()) < 15 and max(angles[0].values()) > max(angles[2].values())


@pytest.mark.parametrize(
    "rule, needle",
    [
        (dict(mirror_angle=-1.0), "rule.mirror_angle"),
        (dict(mirror_angle=50.0), "rule.mirror_angle"),
        (dict(mirror_every=3, mirror_angle=0.0), "needs rule.mirror_angle"),
        (dict(mirror_angle=5.0, mirror_rate=0.0), "rule.mirror_rate"),
    ],
)
def test_bad_mirror_settings_name_the_key(rule, needle):
    with pytest.raises(ValueError, match=needle):
        RuleConfig(**rule)


def test_fixed_synapses_are_not_mirrored():
    spec = replace(_spec(mirror_angle=10.0, feedback_update="fixed", head_init="kaiming"))
    st = Stage(spec)
    before = _feedback([st])
    mirror(list(st.blocks), 10.0, 0, 0)
    after = _feedback([st])
    assert before and all(torch.equal(before[k], after[k]) for k in before)
