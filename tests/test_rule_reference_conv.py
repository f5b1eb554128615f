"""The real rules match the independent float64 reference (tests/reference_conv.py) on a small
convolutional ResNet with BatchNorm (stem, a block with an identity shortcut, two with a
projection shortcut, pooled head), trained with AdamW (and SGD): three optimizer steps of two
micro-batches of unequal size, each normalised by its own batch statistics. Every weight, error
synapse, BatchNorm affine and running statistic must agree to 1e-9.

The first tests check the reference's own formulas (convolution, its adjoint and weight
correlation, BatchNorm's batch Jacobian) against plain torch ops and finite differences, so that
it can be trusted to judge the real implementation.
"""

from __future__ import annotations

import ast
import pathlib

import pytest
import reference_conv as ref
import torch
import torch.nn.functional as F

from workers.models import ModelConfig
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

DT = torch.float64
K, SHAPE, WIDTH, B = 3, (1, 6, 6), 2, 8
SPLITS = (slice(0, 5), slice(5, B))  # two micro-batches per step, of unequal size
TOL = dict(rtol=1e-9, atol=1e-11)


# -- the reference's own formulas ---------------------------------------------------------------


@pytest.mark.parametrize("module", ["reference_conv.py", "reference_lra.py"])
def test_references_import_nothing_from_the_project_and_use_no_autograd(module):
    tree = ast.parse((pathlib.Path(__file__).parent / module).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "torch", "torch.nn.functional"}, imported
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"autograd", "backward", "requires_grad", "requires_grad_", "grad"}


@pytest.mark.parametrize(
    "k,stride,pad,hw", [(3, 1, 1, 6), (3, 2, 1, 6), (3, 2, 1, 5), (1, 2, 0, 6)]
)
def test_reference_conv_adjoint_and_correlation(k, stride, pad, hw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, hw, hw, generator=g, dtype=DT)
    w = torch.randn(4, 2, k, k, generator=g, dtype=DT)
    y = ref.conv2d(x, w, stride, pad)
    torch.testing.assert_close(y, F.conv2d(x, w, stride=stride, padding=pad), rtol=1e-12, atol=0)
    e = torch.randn(y.shape, generator=g, dtype=DT)
    back = ref.conv2d_adjoint(e, w, stride, pad, (hw, hw))
    assert back.shape == x.shape
    # <conv(x, w), e> = <x, conv^T(e)> = <w, corr(x, e)>
    lhs = (y * e).sum()
    torch.testing.assert_close((x * back).sum(), lhs, rtol=1e-12, atol=0)
    torch.testing.assert_close((w * ref.conv2d_corr(x, e, k, stride, pad)).sum(), lhs)


def test_reference_batchnorm_and_its_jacobian():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(4, 3, 5, 5, generator=g, dtype=DT) * 2 + 1
    gamma, beta = torch.randn(3, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    out, xhat, mean, var = ref.bn_train(u, gamma, beta)
    expect = F.batch_norm(u, None, None, gamma, beta, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-13)
    # directional derivative of <bn(u), cot> along v, by central differences
    cot, v = (
        torch.randn(u.shape, generator=g, dtype=DT),
        torch.randn(u.shape, generator=g, dtype=DT),
    )
    eps = 1e-5
    up = (ref.bn_train(u + eps * v, gamma, beta)[0] * cot).sum()
    down = (ref.bn_train(u - eps * v, gamma, beta)[0] * cot).sum()
    jac = (ref.bn_backward(cot, xhat, gamma, var) * v).sum()
    torch.testing.assert_close(jac, (up - down) / (2 * eps), rtol=1e-7, atol=1e-9)
    # running statistics as torch keeps them (unbiased variance)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    F.batch_norm(u, rm, rv, gamma, beta, training=True, momentum=0.1, eps=1e-5)
    stats = {"l.mean": torch.zeros(3, dtype=DT), "l.var": torch.ones(3, dtype=DT)}
    ref.running_update(stats, "l", mean, var, u.numel() // 3)
    torch.testing.assert_close(stats["l.mean"], rm, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["l.var"], rv, rtol=1e-12, atol=0)


# -- the real Stage against the reference --------------------------------------------------------

BASE = dict(
    topology="mirror",
    feedback_update="kp",
    skip_update="kp",
    beta=0.2,
    gamma=0.6,
    mix=1.0,
    mix_skip=1.0,
    carry_bn=True,
    rescale_error=True,
    reproject=0.0,
    optimizer="adamw",
    lr=0.02,
    weight_decay=0.5,
    betas=(0.9, 0.999),
    momentum=0.9,
)
CASES = {
    "mirror": {},
    "mirror-nocarry-raw": dict(carry_bn=False, rescale_error=False),
    "mirror-carry-raw-l1mix-reproject": dict(rescale_error=False, mix=0.3, reproject=0.5),
    "mirror-nocarry-rescale": dict(carry_bn=False),
    "adjacent": dict(topology="adjacent", rescale_error=False),
    "skip-dense": dict(topology="skip", mix=0.24, mix_skip=0.19),
    "skip-dense-local": dict(topology="skip", feedback_update="local", skip_update="local"),
    "mirror-local": dict(feedback_update="local", carry_bn=False),
    "mirror-fixed": dict(feedback_update="fixed"),
    "mirror-sgd-reproject": dict(optimizer="sgd", lr=0.05, weight_decay=0.01, reproject=0.5),
}


def _stage(s: dict) -> Stage:
    rule = RuleConfig(
        name="rec_lra",
        topology=s["topology"],
        feedback_update=s["feedback_update"],
        skip_update=s["skip_update"],
        skip_grid=0,  # dense skip synapses
        beta=s["beta"],
        gamma=s["gamma"],
        mix_skip=s["mix_skip"],
        mix_adjacent=s["mix"],
        reproject=s["reproject"],
        input_noise=0.0,
        mirror_angle=0.0,  # the synapses are copied in from the reference
        carry_bn=s["carry_bn"],
        rescale_error=s["rescale_error"],
    )
    optim = OptimConfig(
        name=s["optimizer"],
        lr=s["lr"],
        weight_decay=s["weight_decay"],
        momentum=s["momentum"],
        beta1=s["betas"][0],
        beta2=s["betas"][1],
        schedule="constant",
    )
    return Stage(
        StageSpec(
            model=ModelConfig(name="resnet8", width=WIDTH, batchnorm=True),
            rule=rule,
            optim=optim,
            input_shape=SHAPE,
            num_classes=K,
            blocks=(0, 5),
            dtype="float64",
        )
    )


def _to_stage(key: str, value: torch.Tensor) -> torch.Tensor:
    """Reference layout -> the stage's: a skip synapse is stored (C*H*W, K) there."""
    return value.reshape(K, -1).T if key.endswith(".M") else value


def _bind(stage: Stage, spec, params: dict, stats: dict):  # noqa: ANN001, ANN202
    """{reference key: the stage's tensor}, for parameters and running statistics; copies the
    reference's values in. Every learnable unit of the stage must be bound."""
    units = stage.units()
    binding, buffers = {}, {}
    for name, layers, _ in spec[0]:
        for lname in layers:
            key, layer = f"{name}.{lname}", units.pop(f"{name}.{lname}")
            assert layer.bias is None and layer.bn is not None, key
            binding[key + ".W"], binding[key + ".gamma"] = layer.weight, layer.bn.weight
            binding[key + ".beta"] = layer.bn.bias
            if layer.feedback is not None:
                binding[key + ".E"] = layer.feedback
            buffers[key + ".mean"], buffers[key + ".var"] = (
                layer.bn.running_mean,
                layer.bn.running_var,
            )
        skip = units.pop(f"{name}.skip{0 if name == 'stem' else 1}", None)
        if skip is not None:
            binding[name + ".M"] = skip.weight
    head = units.pop("head.fc")
    binding["head.fc.W"], binding["head.fc.b"] = head.weight, head.bias
    if head.feedback is not None:
        binding["head.fc.E"] = head.feedback
    assert not units, f"units the reference does not model: {sorted(units)}"
    with torch.no_grad():
        for key, t in binding.items():
            t.copy_(_to_stage(key, params[key]))
        for key, t in buffers.items():
            t.copy_(stats[key])
    return binding, buffers


@pytest.mark.parametrize("case", list(CASES))
def test_three_steps_match_reference(case):
    s = {**BASE, **CASES[case]}
    spec = ref.resnet_spec(SHAPE[0], WIDTH)
    params, stats = ref.init_params(spec, SHAPE, K, seed=3)
    stage = _stage(s)
    binding, buffers = _bind(stage, spec, params, stats)
    # the stage has exactly the error synapses the reference's topology says
    synapses = {k for k in binding if k.endswith(".E")}
    expect = {
        f"{name}.{lname}.E"
        for name, layers, _ in spec[0]
        for lname in layers
        if ref.has_feedback(name, lname, s["topology"])
    }
    if ref.has_feedback("head", "fc", s["topology"]):
        expect.add("head.fc.E")
    assert synapses == expect
    assert any(k.endswith(".M") for k in binding) == (s["topology"] == "skip")
    start = {k: v.clone() for k, v in params.items()}
    opt: dict = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(B, *SHAPE, generator=gen, dtype=DT)
        y = torch.randint(0, K, (B,), generator=gen)
        batches = [(x[sl], y[sl]) for sl in SPLITS]
        with torch.no_grad():  # the reference is plain formulas: no graph needed anywhere
            params, stats, opt = ref.step(params, stats, opt, batches, spec=spec, **s)
        for mb, (xb, yb) in enumerate(batches):
            stage.forward(mb, xb)
            stage.learn(mb, ErrorSignal(labels=yb))
        stage.apply()
    for key, t in binding.items():
        torch.testing.assert_close(t.detach(), _to_stage(key, params[key]), **TOL, msg=key)
        moved = not torch.equal(params[key], start[key])
        assert moved == (s["feedback_update"] != "fixed" or not key.endswith(".E")), key
    for key, t in buffers.items():
        torch.testing.assert_close(t, stats[key], **TOL, msg=key)
