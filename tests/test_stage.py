"""Stage behaviour: partition invariance, micro-batching, state round trips, and refusals.

(a) K = 2 and 3 in-process stages (cut at block boundaries) train to the same weights as K = 1.
(b) M micro-batches then one apply equal one full batch (BatchNorm off: with BatchNorm each
    micro-batch normalises with its own statistics, so the two differ by design).
(c) state_dict -> load_state_dict into a stage built with another seed continues identically
    (weights, BN buffers, AdamW moments, the input-noise RNG, the step); a state from another
    model is refused with StageStateError naming the layer.
(d) apply() refuses a non-finite update with NonFiniteError naming stage, layer and step.
(e) max_cached, and learn without forward.
(f) the last stage without labels.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from unit_states import flat_units

from workers.chain import LocalRunner, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import NonFiniteError, StageSpec, StageStateError
from workers.stage import Stage

K, B = 4, 6
SHAPE = (3, 8, 8)
RANDOM = dict(kp_init="kaiming", head_init="kaiming")  # every synapse moves from step one
RULES = {
    "rec_lra": dict(name="rec_lra"),  # the default recipe
    "rec_lra-skip": dict(name="rec_lra", topology="skip", **RANDOM),
    "rec_lra-mirror": dict(name="rec_lra", topology="mirror", **RANDOM),
    "lra_e": dict(name="lra_e", **RANDOM),
    "dfa": dict(name="dfa"),
    "fa": dict(name="fa"),
    "kp": dict(name="kp", **RANDOM),
    "sign": dict(name="sign"),
    "backprop": dict(name="backprop"),
}
SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
ADAMW = OptimConfig(name="adamw", lr=0.01, weight_decay=1e-3)


def _spec(
    rule: dict,
    *,
    model: ModelConfig | None = None,
    shape=SHAPE,
    optim=SGD,  # noqa: ANN001
    seed: int = 0,
    **rule_kw,
) -> StageSpec:  # noqa: ANN003
    model = model or ModelConfig(name="resnet8", width=3, batchnorm=True)
    n = len(model_plan(model, shape, K))
    return StageSpec(
        model=model,
        rule=RuleConfig(**rule, **rule_kw),
        optim=optim,
        input_shape=shape,
        num_classes=K,
        blocks=(0, n),
        dtype="float64",
        seed=seed,
    )


def _batches(n: int, shape=SHAPE, seed: int = 0, batch: int = B):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, K, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def _assert_close_states(a: dict, b: dict, atol: float, what: str) -> None:
    ta, tb = flat_units(a), flat_units(b)
    assert ta.keys() == tb.keys(), f"{what}: {sorted(ta.keys() ^ tb.keys())}"
    for k in ta:
        if atol == 0:
            assert torch.equal(ta[k], tb[k]), f"{what}: {k}"
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=f"{what}: {k}")


def _train(runner: LocalRunner, batches, micro_batches: int):  # noqa: ANN001, ANN202
    for x, y in batches:
        runner.step(x, y, micro_batches=micro_batches)
    return runner.state_dict()["units"]


# -- (a) partition invariance -----------------------------------------------------------------


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("rule_key", list(RULES))
def test_k_stages_match_one_stage(rule_key, micro_batches):
    base = _spec(RULES[rule_key], input_noise=0.05)
    n = base.blocks[1]
    assert n == 5  # stem, layer1.0, layer2.0, layer3.0, head
    batches = _batches(3)
    init = LocalRunner([base]).state_dict()["units"]
    ref = _train(LocalRunner([base]), batches, micro_batches)
    # training moved every weight: the comparison below is not between initial states
    moved = flat_units(ref)
    for k, v in flat_units(init).items():
        if k.endswith("/weight") and "/optim/" not in k and ".skip" not in k:  # DFA: fixed S
            assert not torch.equal(v, moved[k]), f"{rule_key}: {k} never moved"
    for bounds in ([0, 2, 5], [0, 4, 5], [0, 1, 3, 5], [0, 2, 4, 5]):
        runner = LocalRunner(stage_specs(base, bounds))
        assert len(runner.stages) == len(bounds) - 1
        got = _train(runner, batches, micro_batches)
        _assert_close_states(ref, got, 1e-10, f"{rule_key} bounds {bounds}")


def test_stage_specs_rejects_bad_bounds():
    base = _spec(RULES["dfa"])
    for bad in ([0, 3], [1, 5], [0, 3, 3, 5], [0, 4, 2, 5]):
        with pytest.raises(ValueError, match="boundaries"):
            stage_specs(base, bad)


# -- (b) micro-batches ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule_key", list(RULES))
def test_micro_batches_equal_one_full_batch(rule_key):
    """BatchNorm off: with BN, each micro-batch is normalised by its own statistics, so M
    micro-batches are *by design* not one batch (checked as a contrast below). Input noise off:
    the noise stream is drawn per forward call. Plain SGD, no re-projection: the result then
    depends on the exact scale of the averaged update; uneven chunks (3, 3, 1) catch a mean of
    micro-batch means in place of the sample mean."""
    model = ModelConfig(name="resnet8", width=3, batchnorm=False)
    spec = _spec(
        RULES[rule_key],
        model=model,
        optim=replace(SGD, momentum=0.5),
        input_noise=0.0,
        reproject=0.0,
    )
    full, split = Stage(spec), Stage(spec)
    for step, (x, y) in enumerate(_batches(2, batch=7)):
        full.forward(step, x)
        full.learn(step, ErrorSignal(labels=y))
        full.apply()
        for mb, xs in enumerate(x.split(3)):
            split.forward((step, mb), xs)
        for mb, (_, ys) in reversed(list(enumerate(zip(x.split(3), y.split(3), strict=True)))):
            split.learn((step, mb), ErrorSignal(labels=ys))
        split.apply()
    _assert_close_states(full.state_dict()["units"], split.state_dict()["units"], 1e-10, rule_key)


def test_micro_batches_differ_with_batchnorm_by_design():
    model = ModelConfig(name="resnet8", width=3, batchnorm=True)
    spec = _spec(RULES["rec_lra-skip"], model=model, input_noise=0.0, reproject=0.0)
    full, split = Stage(spec), Stage(spec)
    ((x, y),) = _batches(1, batch=7)
    full.forward(0, x)
    full.learn(0, ErrorSignal(labels=y))
    full.apply()
    for mb, (xs, ys) in enumerate(zip(x.split(3), y.split(3), strict=True)):
        split.forward(mb, xs)
        split.learn(mb, ErrorSignal(labels=ys))
    split.apply()
    a, b = full.units()["stem.conv"].weight, split.units()["stem.conv"].weight
    assert not torch.allclose(a, b, rtol=0, atol=1e-10)


# -- (c) state ------------------------------------------------------------------------------------


def _run_steps(stage: Stage, batches) -> None:  # noqa: ANN001
    for i, (x, y) in enumerate(batches):
        stage.forward(i, x)
        stage.learn(i, ErrorSignal(labels=y))
        stage.apply()


@pytest.mark.parametrize("rule_key", ["rec_lra-skip", "rec_lra-mirror", "backprop"])
def test_state_round_trip_continues_identically(rule_key):
    spec = _spec(RULES[rule_key], optim=ADAMW, input_noise=0.1, feedback_update="local")
    first, later = _batches(2, seed=1), _batches(2, seed=2)
    a = Stage(spec)
    _run_steps(a, first)
    state = a.state_dict()
    assert state["step"] == 2
    moments = [k for k in flat_units(state["units"]) if "/optim/" in k and "exp_avg" in k]
    assert moments, "AdamW moments are not in the state"
    b = Stage(replace(spec, seed=7))  # other weights, other noise stream
    c = Stage(replace(spec, seed=7))  # the same, never loaded: the contrast
    b.load_state_dict(state)
    assert b.step == 2
    _assert_close_states(state["units"], b.state_dict()["units"], 0, "right after load")
    _run_steps(a, later)
    _run_steps(b, later)
    _run_steps(c, later)
    _assert_close_states(a.state_dict()["units"], b.state_dict()["units"], 0, "after 2 more steps")
    assert a.step == b.step == 4
    assert not torch.equal(a.units()["stem.conv"].weight, c.units()["stem.conv"].weight)


def test_state_without_moments_would_differ():
    """Contrast for the round trip: dropping the optimizer state changes the continuation, so
    the test above does check that the moments travel."""
    spec = _spec(RULES["rec_lra-skip"], optim=ADAMW, input_noise=0.0)
    first, later = _batches(2, seed=1), _batches(1, seed=2)
    a = Stage(spec)
    _run_steps(a, first)
    state = a.state_dict()
    for entry in state["units"].values():
        entry["optim"] = {}
    b = Stage(replace(spec, seed=7))
    b.load_state_dict(state)
    _run_steps(a, later)
    _run_steps(b, later)
    assert not torch.equal(a.units()["stem.conv"].weight, b.units()["stem.conv"].weight)


def test_state_moves_between_partitions():
    """A checkpoint of K = 2 stages loads into K = 1 (and back) and continues identically."""
    spec = _spec(RULES["rec_lra-mirror"], optim=ADAMW, input_noise=0.1)
    two = LocalRunner(stage_specs(spec, [0, 3, 5]))
    _train(two, _batches(2, seed=1), 2)
    one = LocalRunner([replace(spec, seed=3)])
    one.load_state_dict(two.state_dict())
    later = _batches(2, seed=2)
    _train(two, later, 2)
    _train(one, later, 2)
    _assert_close_states(two.state_dict()["units"], one.state_dict()["units"], 1e-12, "K2 -> K1")


def _layer_named(message: str, stage: Stage) -> str:
    names = [n for n in stage.units() if re.search(rf"'{re.escape(n)}'", message)]
    assert names, f"no layer of the stage named in: {message}"
    return names[0]


def test_loading_another_model_is_refused():
    spec = _spec(RULES["rec_lra-skip"])
    stage = Stage(spec)
    wider = Stage(replace(spec, model=ModelConfig(name="resnet8", width=4, batchnorm=True)))
    with pytest.raises(StageStateError) as info:
        stage.load_state_dict(wider.state_dict())
    assert _layer_named(str(info.value), stage) == "stem.conv"
    mlp_model = ModelConfig(name="mlp", hidden=5, depth=2)
    mlp = Stage(replace(spec, model=mlp_model, blocks=(0, len(model_plan(mlp_model, SHAPE, K)))))
    with pytest.raises(StageStateError) as info:
        stage.load_state_dict(mlp.state_dict())
    _layer_named(str(info.value), stage)
    with pytest.raises(StageStateError) as info:  # and the other way round
        mlp.load_state_dict(stage.state_dict())
    _layer_named(str(info.value), mlp)


def test_loading_another_rule_is_refused():
    """Skip synapses exist under `skip` only: a mirror checkpoint lacks them."""
    skip = Stage(_spec(RULES["rec_lra-skip"]))
    mirror = Stage(_spec(RULES["rec_lra-mirror"]))
    with pytest.raises(StageStateError, match=r"skip\d"):
        skip.load_state_dict(mirror.state_dict())


def test_loading_a_checkpoint_without_error_synapses_is_refused():
    """The other way round: a mirror stage has an E on each block's first conv, a skip
    checkpoint does not; the refusal must still be a StageStateError naming the layer."""
    skip = Stage(_spec(RULES["rec_lra-skip"]))
    mirror = Stage(_spec(RULES["rec_lra-mirror"]))
    with pytest.raises(StageStateError) as info:
        mirror.load_state_dict(skip.state_dict())
    _layer_named(str(info.value), mirror)


def test_refused_checkpoint_leaves_the_stage_untouched():
    spec = _spec(RULES["rec_lra-skip"])
    stage = Stage(replace(spec, seed=1))
    other = Stage(replace(spec, num_classes=K + 1))  # only the head and skip synapses differ
    before = {k: v.clone() for k, v in flat_units(stage.state_dict()["units"]).items()}
    with pytest.raises(StageStateError):
        stage.load_state_dict(other.state_dict())
    _assert_close_states_flat(before, flat_units(stage.state_dict()["units"]))


def _assert_close_states_flat(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- (d) non-finite updates -----------------------------------------------------------------


def test_apply_refuses_non_finite_update():
    """A NaN in the input of a lower stage: its learn gets a finite e_L from above, so the NaN
    shows up only in the updates, and apply must refuse them, naming stage, layer and step."""
    base = _spec(RULES["rec_lra-skip"], input_noise=0.0)
    low = Stage(replace(stage_specs(base, [0, 2, 5])[0], index=3))
    ((x, y), (x2, _)) = _batches(2)
    e = torch.softmax(torch.randn(B, K, dtype=torch.float64), 1) - torch.eye(K)[y].double()
    low.forward(0, x)
    low.learn(0, ErrorSignal(output_error=e))
    low.apply()  # one good step first, so the step number is not trivially 0
    before = {k: v.detach().clone() for k, v in low.blocks.named_parameters()}
    x2[1, 0, 2, 3] = float("nan")
    low.forward(1, x2)
    low.learn(1, ErrorSignal(output_error=e))
    with pytest.raises(NonFiniteError) as info:
        low.apply()
    msg = str(info.value)
    assert "stage 3" in msg
    assert "step 1" in msg
    assert re.search(r"stem\.conv\.(weight|bias|bn)", msg), msg
    after = dict(low.blocks.named_parameters())
    for k, v in before.items():  # refused: no parameter moved (BN running stats, updated by the
        assert torch.equal(v, after[k]), k  # train-mode forward itself, are not an update)
    assert low.step == 1


def test_learn_refuses_non_finite_output_error():
    stage = Stage(_spec(RULES["dfa"], input_noise=0.0))
    ((x, y),) = _batches(1)
    x[0, 0, 0, 0] = float("inf")
    stage.forward(0, x)
    with pytest.raises(NonFiniteError, match="stage 0"):
        stage.learn(0, ErrorSignal(labels=y))


# -- (e) the cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_key", ["rec_lra-skip", "backprop"])
def test_max_cached_and_learn_without_forward(rule_key):
    stage = Stage(replace(_spec(RULES[rule_key]), max_cached=2))
    ((x, y),) = _batches(1)
    stage.forward("a", x)
    stage.forward("b", x)
    assert stage.cached == 2
    with pytest.raises(RuntimeError, match="cached"):
        stage.forward("c", x)
    stage.learn("a", ErrorSignal(labels=y))
    assert stage.cached == 1
    stage.forward("c", x)  # room again
    with pytest.raises(KeyError):
        stage.learn("never", ErrorSignal(labels=y))
    with pytest.raises(KeyError):
        stage.learn("a", ErrorSignal(labels=y))  # already learned
    stage.drop_cache()
    assert stage.cached == 0


# -- (f) labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_key", ["rec_lra-skip", "lra_e", "backprop"])
def test_last_stage_needs_labels(rule_key):
    base = _spec(RULES[rule_key], input_noise=0.0)
    ((x, _),) = _batches(1)
    for spec in (base, stage_specs(base, [0, 3, 5])[1]):
        stage = Stage(spec)
        assert stage.is_last
        inp = x if stage.is_first else Stage(stage_specs(base, [0, 3, 5])[0]).forward(0, x)
        stage.forward(0, inp)
        e = torch.zeros(B, K, dtype=torch.float64)
        with pytest.raises(ValueError, match="labels"):
            stage.learn(0, ErrorSignal(output_error=e))
