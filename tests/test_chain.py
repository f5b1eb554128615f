"""workers/chain.py and what it shares: how a micro-batch's learning signal goes down the stages,
"is this rule chained" read from the config alone, the one state merge, the stage specs; and
the profiling sample taken once from the first training items."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cluster.group import ActorGroup
from driver.pipeline.build import profile_sample
from driver.pipeline.schedule import LEARN, Op, dependencies
from workers.chain import learn_chain, learns_chained, signal_source, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RULES, ErrorSignal, RuleConfig, make_rule, rule_chained
from workers.spec import StageSpec
from workers.stage import Stage
from workers.state import merge_states

MODEL, SHAPE, K = ModelConfig(name="resnet8", width=2), (1, 8, 8), 4


def _base(**rule) -> StageSpec:  # noqa: ANN003
    n = len(model_plan(MODEL, SHAPE, K))
    return StageSpec(
        model=MODEL,
        rule=RuleConfig(**rule),
        optim=OptimConfig(),
        input_shape=SHAPE,
        num_classes=K,
        blocks=(0, n),
    )


@pytest.mark.parametrize(
    ("rule", "chained"),
    [
        ({"name": "rec_lra", "topology": "skip"}, False),
        ({"name": "rec_lra", "topology": "stage"}, False),
        ({"name": "rec_lra", "topology": "mirror"}, True),
        ({"name": "rec_lra", "topology": "adjacent"}, True),
        ({"name": "dfa"}, False),
        ({"name": "lra_e"}, True),
        ({"name": "fa"}, True),
        ({"name": "kp"}, True),
        ({"name": "sign"}, True),
        ({"name": "backprop"}, True),
    ],
)
def test_rule_chained_is_read_from_the_config(rule, chained):
    cfg = RuleConfig(**rule)
    assert rule_chained(cfg) is chained
    assert RULES[cfg.name].is_chained(cfg) is type(make_rule(cfg)).is_chained(cfg)
    spec = replace(_base(**rule), blocks=(2, 5))
    assert Stage(spec).chained is chained
    assert learns_chained(spec) is chained
    assert learns_chained(replace(spec, diagnose_every=3))  # backprop's gradient goes down


class _Recorder:
    def __init__(self, i: int, got: list) -> None:
        self.i, self.got = i, got

    def forward(self, mb, x):  # noqa: ANN001, ANN201
        return x

    def learn(self, mb, signal, *, apply=False):  # noqa: ANN001, ANN201
        self.got.append((self.i, signal))
        return ErrorSignal(output_error=torch.tensor([float(self.i)]))


@pytest.mark.parametrize("chained", [True, False])
def test_learn_chain_routes_each_signal_from_its_source(chained):
    got: list = []
    stages = [_Recorder(i, got) for i in range(4)]
    labels = torch.tensor([1, 2])
    sent = learn_chain(stages, 0, labels, chained=chained)
    assert [i for i, _ in got] == [3, 2, 1, 0]  # top first
    assert got[0][1].labels is labels
    for i, signal in got[1:]:
        assert signal.labels is None
        assert float(signal.output_error) == signal_source(i, 4, chained)
        assert signal_source(i, 4, chained) == (i + 1 if chained else 3)
    assert [float(s.output_error) for s in sent] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("chained", [True, False])
def test_the_schedule_waits_for_the_same_source(chained):
    for s in range(3):
        want = Op(LEARN, signal_source(s, 4, chained), 5)
        assert dependencies(Op(LEARN, s, 5), 4, chained=chained) == [want]


def test_merge_states_takes_every_unit_and_stage_zeros_counters():
    states = [
        {"units": {"a": 1}, "step": 3, "progress": 2.5, "noise_rng": "rng0"},
        {"units": {"b": 2, "c": 3}, "step": 7, "progress": 9.0, "noise_rng": "rng1"},
    ]
    assert merge_states(states) == {
        "units": {"a": 1, "b": 2, "c": 3},
        "step": 3,
        "progress": 2.5,
        "noise_rng": "rng0",
    }


def test_stage_specs_take_the_block_count_from_the_base():
    base = _base()
    specs = stage_specs(base, [0, 2, 5])
    assert [s.blocks for s in specs] == [(0, 2), (2, 5)] and [s.index for s in specs] == [0, 1]
    with pytest.raises(ValueError, match="whole model"):
        stage_specs(replace(base, blocks=(1, 5)), [0, 2, 5])


def test_profile_sample_is_the_first_items_of_one_micro_batch():
    x = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    train = list(zip(x, range(10), strict=True))
    cfg = SimpleNamespace(
        train=SimpleNamespace(batch_size=8), pipeline=SimpleNamespace(micro_batches=4)
    )
    xs, ys = profile_sample(cfg, SimpleNamespace(train=train))  # type: ignore[arg-type]
    assert torch.equal(xs, x[:2]) and ys.tolist() == [0, 1]
    cfg.train.batch_size = 64  # more than the data: a micro-batch of what there is
    xs, _ = profile_sample(cfg, SimpleNamespace(train=train))  # type: ignore[arg-type]
    assert len(xs) == 10 // 4


def test_an_actor_group_needs_a_ping_to_probe():
    class Silent:
        pass

    with pytest.raises(TypeError, match="ping"):
        ActorGroup(Silent, [()], cpus=1, gpus=0, timeout_key="k")
