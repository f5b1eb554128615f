"""Shapes: every error synapse restores its layer's exact input shape, and is the true adjoint.

Layer level: Conv (stride 1/2, kernel 1/3/7, padding 0/1/3, odd and even inputs), projection
shortcuts, the pooled head and Dense; `transpose` must equal autograd's vector-Jacobian product
of `linear` (so with E == W the synapse is W^T exactly). Model level: a Stage per model/form runs
forward/learn/apply, each block's declared `node_shapes` matches the node tensors the forward
really makes, and the skip synapses (dense, factored, non-dividing grid) land on those shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workers.chain import stage_specs
from workers.layers import Conv, Dense, PooledHead
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage
from workers.synapses import SkipSynapse

DT = torch.float64
K = 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _equip(layer, seed: int = 0):  # noqa: ANN001, ANN202
    """Random W and an independent random E, float64."""
    layer.add_feedback(trainable=True)
    layer.to(DT)
    g = _gen(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=DT))
        layer.feedback.copy_(torch.randn(layer.feedback.shape, generator=g, dtype=DT))
    return layer


def _check_adjoint(layer, x: torch.Tensor, seed: int = 1) -> None:  # noqa: ANN001
    """carry restores x's shape; transpose(., W) is autograd's VJP of linear(., W); weight_grad is
    autograd's weight gradient; <W x, e> == <x, W^T e>."""
    out = layer.linear(x, layer.weight)
    e = _randn(*out.shape, seed=seed)
    carried = layer.carry(e, x)
    assert carried.shape == x.shape
    assert torch.isfinite(carried).all()
    # carry applies E, not W
    torch.testing.assert_close(carried, layer.transpose(e, layer.feedback, x), rtol=0, atol=0)
    xr = x.clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(layer.linear(xr, w), (xr, w), e)
    tr = layer.transpose(e, layer.weight.detach(), x)
    assert tr.shape == x.shape
    torch.testing.assert_close(tr, gx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((out * e).sum(), (x * tr).sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight_grad(x, e), gw, rtol=1e-10, atol=1e-10)
    # the source tensor only gives the shape: its values (even NaN) and layout do not matter
    poison = torch.full_like(x, float("nan"))
    torch.testing.assert_close(
        layer.transpose(e, layer.weight.detach(), poison), tr, rtol=0, atol=0
    )
    if x.dim() == 4:
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(
            layer.transpose(e, layer.weight.detach(), cl), tr, rtol=1e-12, atol=1e-12
        )


SIZES = [(7, 7), (9, 11), (32, 32), (15, 15), (8, 8), (10, 13)]
CONV_CASES = [
    (k, s, p, hw)
    for k in (1, 3, 7)
    for s in (1, 2)
    for p in (0, 1, 3)
    for hw in SIZES
    if min(hw) + 2 * p >= k
]


@pytest.mark.parametrize("k,s,p,hw", CONV_CASES, ids=lambda v: str(v))
def test_conv_error_synapse_restores_shape_and_is_adjoint(k, s, p, hw):
    layer = _equip(Conv(3, 4, k, stride=s, padding=p))
    x = _randn(2, 3, *hw, seed=7)
    out = layer(x)
    assert out.shape[-2:] == torch.Size(layer.out_hw(*hw))
    _check_adjoint(layer, x)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (9, 11), (32, 32), (13, 13)])
def test_projection_shortcut(hw):
    layer = _equip(Conv(4, 8, 1, stride=2, padding=0))
    x = _randn(3, 4, *hw, seed=3)
    assert layer(x).shape == (3, 8, (hw[0] + 1) // 2, (hw[1] + 1) // 2)
    _check_adjoint(layer, x)


@pytest.mark.parametrize("hw", [(1, 1), (4, 4), (5, 7), (13, 13)])
def test_pooled_head_spreads_evenly_over_hw(hw):
    head = _equip(PooledHead(6, K))
    x = _randn(3, 6, *hw, seed=4)
    assert head(x).shape == (3, K)
    _check_adjoint(head, x)
    e = _randn(3, K, seed=5)
    d = head.carry(e, x)
    per_channel = (e @ head.feedback) / (hw[0] * hw[1])
    torch.testing.assert_close(d, per_channel[:, :, None, None].expand_as(d), rtol=0, atol=1e-14)


def test_pooled_head_on_flat_input():
    head = _equip(PooledHead(6, K))
    _check_adjoint(head, _randn(3, 6, seed=2))


@pytest.mark.parametrize("src", [(10,), (1, 8, 8), (3, 2, 5)])
def test_dense_restores_source_shape(src):
    layer = _equip(Dense(math.prod(src), 7))
    _check_adjoint(layer, _randn(4, *src, seed=6))


# -- whole models ------------------------------------------------------------------------------

MODEL_CASES = [
    ("resnet8", "cifar", (3, 13, 13)),
    ("resnet8", "cifar", (3, 32, 32)),
    ("resnet18", "cifar", (3, 13, 13)),
    ("resnet18", "cifar", (3, 32, 32)),
    ("resnet18", "imagenet", (3, 64, 64)),
    ("resnet18", "imagenet", (3, 57, 57)),
    ("mlp", "cifar", (1, 8, 8)),
    ("mlp", "cifar", (10,)),
]


def _model(name: str, form: str, **kw) -> ModelConfig:  # noqa: ANN003
    return ModelConfig(name=name, form=form, width=2, hidden=6, depth=4, gap=2, residual=True, **kw)


def _spec(model: ModelConfig, shape: tuple[int, ...], rule: RuleConfig, **kw) -> StageSpec:  # noqa: ANN003
    n = len(model_plan(model, shape, K))
    base = dict(
        model=model,
        rule=rule,
        optim=OptimConfig(name="sgd", lr=0.01),
        input_shape=shape,
        num_classes=K,
        blocks=(0, n),
    )
    base.update(kw)
    return StageSpec(**base)


def _walk_nodes(stage: Stage, x: torch.Tensor):  # noqa: ANN202
    """(block, cache) for every block of a stage, from its real local forward."""
    out = x.to(stage.dtype)
    pairs = []
    for block in stage.blocks:
        cache_in = out
        out, cache = block.forward_local(out)
        assert cache.input.shape == cache_in.shape
        pairs.append((block, cache))
    return out, pairs


@pytest.mark.parametrize("name,form,shape", MODEL_CASES, ids=lambda v: str(v))
def test_model_node_shapes_and_mirror_stage_runs(name, form, shape):
    model = _model(name, form)
    rule = RuleConfig(name="rec_lra", topology="mirror", input_noise=0.0)
    stage = Stage(_spec(model, shape, rule))
    x = torch.randn(2, *shape, generator=_gen(0))
    y = torch.tensor([0, 3])
    out, walked = _walk_nodes(stage, x)
    assert out.shape == (2, K)
    for block, cache in walked:
        assert tuple(cache.input.shape[1:]) == tuple(block.in_shape), block.name
        assert len(block.node_shapes) == len(cache.z) == len(block.acts), block.name
        for n, z in enumerate(cache.z):
            assert tuple(z.shape[1:]) == tuple(block.node_shapes[n]), (block.name, n)
            assert cache.h[n].shape == z.shape
    # consecutive blocks agree on the junction shapes
    for (below, _), (above, cache) in zip(walked, walked[1:], strict=False):
        pooled = cache.input.shape[1:]
        assert tuple(pooled) == tuple(above.in_shape), (below.name, above.name)
    # mirror: every layer except the one reading the data has an error synapse
    for block in stage.blocks:
        for wire in block.wires:
            layer = block.layers[wire.layer]
            first = block.name in ("stem", "dense0") and wire.src < 0
            assert (layer.feedback is None) == first, f"{block.name}.{wire.layer}"
    before = {k: v.detach().clone() for k, v in stage.blocks.state_dict().items()}
    logits = stage.forward(0, x)
    assert logits.shape == (2, K)
    sig = stage.learn(0, ErrorSignal(labels=y))
    assert sig.output_error.shape == (2, K)
    assert sig.boundary is None  # the first stage sends nothing to the data
    for uname, unit in stage.units().items():
        for pname, p in unit.named_parameters():
            if p.requires_grad and pname != "feedback":  # kp E is set at apply
                assert p.grad is not None and p.grad.shape == p.shape, f"{uname}.{pname}"
                assert torch.isfinite(p.grad).all(), f"{uname}.{pname}"
    stage.apply()
    after = stage.blocks.state_dict()
    changed = [
        k for k, v in before.items() if k.endswith("weight") and not torch.equal(v, after[k])
    ]
    assert changed, "apply changed no weight"


@pytest.mark.parametrize(
    "name,form,shape",
    [
        ("resnet8", "cifar", (3, 13, 13)),
        ("resnet18", "imagenet", (3, 57, 57)),
        ("mlp", "cifar", (1, 8, 8)),
    ],
    ids=lambda v: str(v),
)
def test_boundary_displacement_has_stage_input_shape(name, form, shape):
    """Cut at every block boundary: each stage's boundary displacement is its input's shape."""
    model = _model(name, form)
    rule = RuleConfig(name="rec_lra", topology="mirror", input_noise=0.0)
    n = len(model_plan(model, shape, K))
    specs = stage_specs(_spec(model, shape, rule), list(range(n + 1)))
    stages = [Stage(s) for s in specs]
    x = torch.randn(3, *shape, generator=_gen(1))
    ins = []
    out = x
    for st in stages:
        ins.append(out)
        out = st.forward(0, out)
    signal = ErrorSignal(labels=torch.tensor([1, 2, 4]))
    for i in reversed(range(n)):
        below = stages[i].learn(0, signal)
        if i == 0:
            assert below.boundary is None
        else:
            assert below.boundary is not None, i
            assert below.boundary.shape == ins[i].shape, (i, stages[i].blocks[0].name)
        signal = ErrorSignal(output_error=below.output_error, boundary=below.boundary)


# -- skip synapses ------------------------------------------------------------------------------


def _pullback_autograd(syn: SkipSynapse, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """d<S(e), v>/dS through the synapse's own forward (autograd)."""
    (g,) = torch.autograd.grad(syn(e), syn.weight, v)
    return g


def _skip_reference(
    w: torch.Tensor, e: torch.Tensor, shape: tuple[int, ...], grid: int, dense: bool
) -> torch.Tensor:
    """Independent S(e): the dense map to the inner C x g x g grid (g clipped to H and W), then
    nearest upsampling to H x W."""
    v = e @ w.T
    if not dense:
        inner = (shape[0], min(grid, shape[1]), min(grid, shape[2]))
        v = F.interpolate(v.view(e.shape[0], *inner), size=shape[1:], mode="nearest")
    return v.reshape(e.shape[0], *shape)


@pytest.mark.parametrize(
    "shape,grid,dense",
    [
        ((3, 8, 8), 0, True),
        ((3, 8, 8), 4, False),
        ((3, 8, 8), 3, False),  # 3 does not divide 8
        ((3, 13, 13), 4, False),  # 4 does not divide 13
        ((3, 13, 13), 3, False),
        ((3, 8, 8), 8, True),  # a grid as large as the junction is dense
        ((3, 6, 10), 4, False),  # non-square; grid clipped to H
        ((3, 2, 2), 4, True),
        ((2, 29, 29), 4, False),  # the ImageNet stem node at 57 x 57 input
        ((2, 7, 15), 4, False),
        ((7,), 4, True),  # MLP junctions are always dense
    ],
)
def test_skip_synapse_shape_and_pullback(shape, grid, dense):
    syn = SkipSynapse(K, shape, grid).to(DT)
    with torch.no_grad():
        syn.weight.copy_(_randn(*syn.weight.shape, seed=2))
    factored = shape[0] * min(grid, shape[1]) * min(grid, shape[2]) if not dense else 0
    expected_rows = math.prod(shape) if dense else factored
    assert syn.weight.shape == (expected_rows, K)
    e = _randn(4, K, seed=3)
    d = syn(e)
    assert d.shape == (4, *shape)
    expect = _skip_reference(syn.weight.detach(), e, shape, grid, dense)
    torch.testing.assert_close(d, expect, rtol=1e-12, atol=1e-12)
    v = _randn(4, *shape, seed=4)
    pb = syn.pullback(e, v)
    assert pb.shape == syn.weight.shape
    torch.testing.assert_close(pb, _pullback_autograd(syn, e, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grid", [0, 4, 3])
@pytest.mark.parametrize(
    "name,form,shape",
    [
        ("resnet8", "cifar", (3, 8, 8)),
        ("resnet8", "cifar", (3, 13, 13)),
        ("resnet18", "imagenet", (3, 57, 57)),
        ("mlp", "cifar", (1, 8, 8)),
    ],
    ids=lambda v: str(v),
)
def test_skip_topology_synapses_match_node_shapes(name, form, shape, grid):
    model = _model(name, form)
    rule = RuleConfig(name="rec_lra", topology="skip", skip_grid=grid, input_noise=0.0)
    stage = Stage(_spec(model, shape, rule))
    x = torch.randn(2, *shape, generator=_gen(2))
    e = torch.randn(2, K, generator=_gen(3))
    _, walked = _walk_nodes(stage, x)
    n_skips = 0
    for block, cache in walked:
        if block.head:
            assert len(block.skips) == 0
            continue
        assert set(block.skips) == {str(block.out_node)}, block.name  # junctions only
        for key, syn in block.skips.items():
            n = int(key)
            d = syn(e)
            assert tuple(d.shape) == tuple(cache.z[n].shape), (block.name, n)
            assert tuple(d.shape[1:]) == tuple(block.node_shapes[n])
            assert syn.pullback(e, cache.z[n]).shape == syn.weight.shape
            n_skips += 1
    assert n_skips == len(walked) - 1
    stage.forward(0, x)
    stage.learn(0, ErrorSignal(labels=torch.tensor([0, 4])))
    for block in stage.blocks:
        for syn in block.skips.values():
            assert syn.weight.grad is not None and torch.isfinite(syn.weight.grad).all()
    stage.apply()


def test_imagenet_stem_unpool_is_the_true_adjoint_of_its_max_pool():
    """<pool(z) . d> summed through the argmax routing must equal autograd's VJP, including
    positions that win several overlapping 3x3 stride-2 windows."""
    from workers.blocks import BlockCache
    from workers.models import ModelConfig, model_plan

    stem = model_plan(ModelConfig(name="resnet8", form="imagenet", width=2), (3, 9, 9), 4)[0][1]()
    z = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    z[0, 0, 3, 3] = 10.0  # wins four windows
    z.requires_grad_(True)
    pooled, idx = torch.nn.functional.max_pool2d(z, 3, stride=2, padding=1, return_indices=True)
    d = torch.randn_like(pooled)
    (expected,) = torch.autograd.grad(pooled, z, d)
    cache = BlockCache(input=torch.zeros(2, 3, 9, 9), z=[z.detach()], pool_index=idx)
    got = stem.unpool(d, cache)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
