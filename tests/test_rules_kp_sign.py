"""The `kp` (Kolen-Pollack) and `sign` (sign symmetry) rules, against what they claim to be.

(a) kp with E = W is backprop: every layer's gradient, across a stage boundary too.
(b) kp given FA's error synapses makes FA's forward-weight updates; E never gets a gradient of
    its own from the autograd path, only its layer's update at apply.
(c) KP with matched decay: E(t) - gamma W(t) = c_t (E(0) - gamma W(0)), c_t the product of
    (1 - lr_s weight_decay) over the steps taken (cosine schedule).
(d) sign equals a plain-autograd reference written here (a custom Function whose backward
    through W uses rms(W) sign(W)), and is not backprop.
(e) K stages train to the weights of one stage.
(f) both rules get their recipes from the config.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from unit_states import flat_units

from workers.chain import LocalRunner, forward_chain, learn_chain, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RULES, ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

K, B = 5, 8
RESNET = ModelConfig(name="resnet8", width=4, batchnorm=True)
RESNET_SHAPE = (1, 8, 8)
MLP = ModelConfig(name="mlp", hidden=12, depth=4, gap=2, residual=True, batchnorm=True)
MLP_SHAPE = (2, 3, 3)
MODELS = {"resnet8": (RESNET, RESNET_SHAPE), "mlp": (MLP, MLP_SHAPE)}
# E from a random start, never set by the weight mirror (whose default would align it first)
RANDOM = dict(
    kp_init="kaiming", head_init="kaiming", input_noise=0.0, reproject=0.0, mirror_angle=0.0
)
ADAMW = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, schedule="constant")
SGD = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")


def _spec(rule: RuleConfig, model_key: str = "resnet8", optim: OptimConfig = ADAMW) -> StageSpec:
    model, shape = MODELS[model_key]
    return StageSpec(
        model=model,
        rule=rule,
        optim=optim,
        input_shape=shape,
        num_classes=K,
        blocks=(0, len(model_plan(model, shape, K))),
        dtype="float64",
        seed=2,
    )


def _batch(model_key: str = "resnet8", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *MODELS[model_key][1], generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (B,), generator=g)


def _params(stages: list[Stage]) -> dict[str, torch.nn.Parameter]:
    return {n: p for s in stages for n, p in s._named_params}


def _forward_params(stages: list[Stage]) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in _params(stages).items() if not n.endswith(".feedback")}


def _copy_forward_params(src: list[Stage], dst: list[Stage]) -> None:
    """Give `dst` the forward weights of `src` (rules draw E from the same generator as W, so
    two rules built with one seed need not start with the same W)."""
    theirs = _forward_params(src)
    mine = _forward_params(dst)
    assert mine.keys() == theirs.keys()
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(theirs[name])


def _grads(stages: list[Stage], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's .grad after one micro-batch's forward and learn (before apply)."""
    forward_chain(stages, 0, x)
    learn_chain(stages, 0, y, chained=True)
    return {n: p.grad.clone() for n, p in _params(stages).items() if p.grad is not None}


def _stages(spec: StageSpec, bounds: list[int] | None) -> list[Stage]:
    return [Stage(s) for s in (stage_specs(spec, bounds) if bounds else [spec])]


# -- (a) kp with E = W is backprop --------------------------------------------------------------


@pytest.mark.parametrize("bounds", [None, [0, 2, 5]], ids=["1-stage", "2-stages"])
def test_kp_with_E_equal_to_W_is_backprop(bounds):
    kp = _stages(_spec(RuleConfig(name="kp", **RANDOM)), bounds)
    bp = _stages(_spec(RuleConfig(name="backprop", **RANDOM)), bounds)
    _copy_forward_params(kp, bp)
    tied = 0
    with torch.no_grad():
        for stage in kp:
            for feedback, weight in stage._kp:
                assert feedback is not None
                assert not torch.allclose(feedback, weight)  # a random start, so this ties them
                feedback.copy_(weight)
                tied += 1
    assert tied == 9  # every layer but the stem, which sends nothing below the data
    x, y = _batch()
    got, want = _grads(kp, x, y), _grads(bp, x, y)
    assert set(want) == set(_forward_params(bp))  # every forward parameter has a gradient
    assert set(got) == set(want)  # and no error synapse got one of its own
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-10, msg=name)


def test_kp_with_a_random_E_is_not_backprop():
    """The contrast: (a) is not vacuous, E is what carries the error below the head."""
    kp = _stages(_spec(RuleConfig(name="kp", **RANDOM)), None)
    bp = _stages(_spec(RuleConfig(name="backprop", **RANDOM)), None)
    _copy_forward_params(kp, bp)
    x, y = _batch()
    got, want = _grads(kp, x, y), _grads(bp, x, y)
    torch.testing.assert_close(got["head.fc.weight"], want["head.fc.weight"], rtol=0, atol=1e-12)
    off = [n for n in want if n.endswith(".weight") and not torch.allclose(got[n], want[n])]
    assert len(off) >= 9, off


# -- (b) kp is FA whose synapses learn --------------------------------------------------------


def test_kp_given_fa_synapses_makes_fa_updates_and_E_learns_only_at_apply():
    fa = LocalRunner([_spec(RuleConfig(name="fa", **RANDOM))])
    kp = LocalRunner([_spec(RuleConfig(name="kp", **RANDOM))])
    _copy_forward_params(fa.stages, kp.stages)
    fa_units, kp_units = fa.stages[0].units(), kp.stages[0].units()
    with torch.no_grad():
        for name, unit in kp_units.items():
            if unit.feedback is not None:
                unit.feedback.copy_(fa_units[name].feedback)
    assert {n for n, u in kp_units.items() if u.feedback is not None} == {
        n for n, u in fa_units.items() if u.feedback is not None
    }
    e0 = {n: u.feedback.detach().clone() for n, u in kp_units.items() if u.feedback is not None}
    w0 = {n: p.detach().clone() for n, p in _forward_params(kp.stages).items()}
    x, y = _batch(seed=1)
    fa.step(x, y)
    stage = kp.stages[0]  # kp.step(x, y), with a look in between learn and apply:
    stage.forward(0, x)
    stage.learn(0, ErrorSignal(labels=y))
    assert all(kp_units[n].feedback.grad is None for n in e0)  # none from the autograd path
    assert all(kp_units[n].feedback.requires_grad for n in e0)  # yet they learn, by KP
    stage.apply()
    fa_w, kp_w = _forward_params(fa.stages), _forward_params(kp.stages)
    for name, p in kp_w.items():
        torch.testing.assert_close(p, fa_w[name], rtol=0, atol=1e-12, msg=name)
        assert not torch.equal(p, w0[name]), f"{name} never moved"
    for name, e in e0.items():
        assert torch.equal(fa_units[name].feedback, e)  # FA's synapses are fixed
        assert not torch.equal(kp_units[name].feedback, e)  # KP's moved


# -- (c) KP's invariant under matched decay ---------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_kp_gap_to_gamma_W_shrinks_by_the_decay_product(gamma):
    steps, lr, wd = 20, 2e-2, 1.0
    optim = OptimConfig(name="adamw", lr=lr, weight_decay=wd, schedule="cosine", total_steps=steps)
    runner = LocalRunner([_spec(RuleConfig(name="kp", gamma=gamma, **RANDOM), optim=optim)])
    pairs = [(e, w) for e, w in runner.stages[0]._kp if e is not None]
    assert len(pairs) == 9
    gap0 = [(e - gamma * w).detach().clone() for e, w in pairs]
    w0 = [w.detach().clone() for _, w in pairs]
    c = 1.0
    for step in range(steps):
        runner.step(*_batch(seed=step))
        lr_s = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        c *= 1.0 - lr_s * wd
        for (e, w), g0 in zip(pairs, gap0, strict=True):
            torch.testing.assert_close(e - gamma * w, c * g0, rtol=0, atol=1e-8)
    assert c < 0.9  # the decay did act
    # and W learned far more than the decay alone would have moved it
    assert all(
        not torch.allclose(w, c * w_0, atol=1e-3) for (_, w), w_0 in zip(pairs, w0, strict=True)
    )


# -- (d) sign against a plain-autograd reference ----------------------------------------------


def _scaled_sign(w: torch.Tensor) -> torch.Tensor:
    """sign(W) with W's Frobenius norm, written out."""
    return torch.sign(w) * (w.pow(2).sum() / w.numel()).sqrt()


class _RefConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, stride, padding):  # noqa: ANN001, ANN205
        ctx.save_for_backward(z, w)
        ctx.conf = (stride, padding)
        return F.conv2d(z, w, stride=stride, padding=padding)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        z, w = ctx.saved_tensors
        stride, padding = ctx.conf
        gz = torch.nn.grad.conv2d_input(z.shape, _scaled_sign(w), g, stride=stride, padding=padding)
        gw = torch.nn.grad.conv2d_weight(z, w.shape, g, stride=stride, padding=padding)
        return gz, gw, None, None


class _RefMatmul(torch.autograd.Function):
    """a @ w.T for a 2-d a."""

    @staticmethod
    def forward(ctx, a, w):  # noqa: ANN001, ANN205
        ctx.save_for_backward(a, w)
        return a @ w.T

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        a, w = ctx.saved_tensors
        return g @ _scaled_sign(w), g.T @ a


def _reference_grads(
    stage: Stage, model_key: str, x: torch.Tensor, y: torch.Tensor, *, sign: bool
) -> dict[str, torch.Tensor]:
    """Plain autograd through fresh blocks holding the stage's weights; with `sign`, every
    layer's bare map W z is a Function whose backward uses rms(W) sign(W) in place of W."""
    model, shape = MODELS[model_key]
    blocks = []
    for name, factory in model_plan(model, shape, K):
        block = factory().to(torch.float64)
        block.load_state_dict(stage.blocks[len(blocks)].state_dict(), strict=False)
        assert block.name == name
        if sign:
            for _, layer in block.layer_items():
                kind = layer.kind
                if kind == "conv":
                    s, p = layer.stride, layer.padding
                    layer.linear = lambda z, w, s=s, p=p: _RefConv.apply(z, w, s, p)
                elif kind == "head":
                    layer.linear = lambda z, w: _RefMatmul.apply(
                        z.mean(dim=(2, 3)) if z.dim() == 4 else z.flatten(1), w
                    )
                else:
                    layer.linear = lambda z, w: _RefMatmul.apply(z.flatten(1), w)
        blocks.append(block.train())
    out = x
    for block in blocks:
        out = block(out)
    F.cross_entropy(out, y, reduction="sum").backward()
    return {
        f"{block.name}.{lname}.{pname}": p.grad
        for block in blocks
        for lname, layer in block.layer_items()
        for pname, p in layer.named_parameters()
    }


@pytest.mark.parametrize("model_key", list(MODELS))
def test_sign_equals_a_plain_autograd_reference(model_key):
    stage = Stage(_spec(RuleConfig(name="sign", **RANDOM), model_key))
    assert not any(u.feedback is not None for u in stage.units().values())  # no parameter
    assert stage.optimizer.param_groups[-1]["lr_scale"] == 1.0  # and no synapse group
    x, y = _batch(model_key, seed=4)
    want = _reference_grads(stage, model_key, x, y, sign=True)
    got = _grads([stage], x, y)
    assert set(got) == set(want) and len(want) > 4
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-10, msg=name)
    # the reference is not backprop: the scaled sign carries a different error below the head
    bp = _reference_grads(stage, model_key, x, y, sign=False)
    differ = [n for n in want if n.endswith(".weight") and not torch.allclose(want[n], bp[n])]
    assert len(differ) >= 3, differ


def test_sign_reads_W_as_it_is_when_the_error_arrives():
    """The feedback is recomputed at each use: a W changed between forward and learn (an
    async apply) changes the error carried down, as it would change backprop's W^T."""
    x, y = _batch(seed=6)
    a, b = (Stage(_spec(RuleConfig(name="sign", **RANDOM))) for _ in range(2))
    for stage in (a, b):
        stage.forward(0, x)
    w = b.units()["layer2.0.conv2"].weight
    with torch.no_grad():  # flip and rescale half of W's rows (an optimizer step's way: no
        w.data[: w.shape[0] // 2].mul_(-3.0)  # version bump for the cached graph to trip on)
    ga, gb = _grads_after_learn(a, y), _grads_after_learn(b, y)
    torch.testing.assert_close(ga["head.fc.weight"], gb["head.fc.weight"], rtol=0, atol=0)
    assert not torch.allclose(ga["layer1.0.conv1.weight"], gb["layer1.0.conv1.weight"])


def _grads_after_learn(stage: Stage, y: torch.Tensor) -> dict[str, torch.Tensor]:
    stage.learn(0, ErrorSignal(labels=y))
    return {n: p.grad.clone() for n, p in stage._named_params if p.grad is not None}


# -- (e) K stages = 1 stage -------------------------------------------------------------------


def _units_state(runner: LocalRunner) -> dict[str, torch.Tensor]:
    return flat_units(runner.state_dict()["units"])


@pytest.mark.parametrize(
    ("model_key", "bounds"), [("resnet8", [0, 2, 5]), ("resnet8", [0, 4, 5]), ("mlp", [0, 1, 3])]
)
@pytest.mark.parametrize("rule", ["kp", "sign"])
def test_two_stages_train_like_one(rule, model_key, bounds):
    spec = _spec(RuleConfig(name=rule, **RANDOM), model_key)
    one, two = LocalRunner([spec]), LocalRunner(stage_specs(spec, bounds))
    assert len(two.stages) == 2
    start = _units_state(one)
    for step in range(3):
        x, y = _batch(model_key, seed=10 + step)
        one.step(x, y, micro_batches=2)
        two.step(x, y, micro_batches=2)
    want, got = _units_state(one), _units_state(two)
    assert want.keys() == got.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-10, msg=k)
    moved = [k for k in start if k.endswith("/weight") and not torch.equal(start[k], want[k])]
    assert len(moved) == sum(k.endswith("/weight") and "/optim/" not in k for k in start)
    if rule == "kp":
        assert any(k.endswith("/feedback") and not torch.equal(start[k], want[k]) for k in start)


# -- (f) recipes ------------------------------------------------------------------------------


def test_kp_and_sign_are_registered_and_get_their_recipes():
    from driver.config import load_config
    from workers.rules.recipes import RECIPES

    assert {"kp", "sign"} <= set(RULES)
    kp = load_config(None, ["rule.name=kp"])
    assert kp.rule.name == "kp"
    assert (kp.optim.name, kp.optim.lr, kp.optim.weight_decay) == ("adamw", 3e-3, 1.0)
    assert kp.rule.kp_init == "kaiming" and kp.rule.head_init == "kaiming"  # Akrout: random E
    assert kp.rule.mirror_angle == 0.0  # not set by the weight mirror first
    assert kp.rule.input_noise == 0.0 and kp.rule.reproject == 0.0
    sign = load_config(None, ["rule.name=sign"])
    bp = load_config(None, ["rule.name=backprop"])
    assert sign.rule.name == "sign"
    assert RECIPES["sign"] == RECIPES["backprop"]
    for key in RECIPES["backprop"]["optim"]:
        assert getattr(sign.optim, key) == getattr(bp.optim, key), key
    for key in RECIPES["backprop"]["rule"]:
        assert getattr(sign.rule, key) == getattr(bp.rule, key), key
