"""The `backprop` rule through Stage / LocalRunner is exact autograd.

A plain torch loop, written here without the Stage machinery (the model's blocks chained as one
module, mean cross-entropy, `zero_grad(); backward(); step()`), must end at the same weights,
BatchNorm buffers and optimizer moments as 1 stage and as 3 in-process stages passing boundary
gradients, and as 2 micro-batches accumulated into one apply (BatchNorm off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.chain import LocalRunner, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec

SHAPE, CLASSES, BATCH, STEPS = (2, 8, 8), 5, 8, 4
RULE = RuleConfig(name="backprop", input_noise=0.0, reproject=0.0)
ADAMW = OptimConfig(
    name="adamw", lr=0.02, beta1=0.8, beta2=0.95, weight_decay=0.05, schedule="constant"
)
SGD = OptimConfig(name="sgd", lr=0.1, momentum=0.7, weight_decay=0.01, schedule="constant")
RESNET = ModelConfig(name="resnet8", width=4, batchnorm=True)
ATOL = 1e-9


class Plain(nn.Module):
    """The model's blocks called one after another: nothing else."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _spec(model: ModelConfig, optim: OptimConfig, shape: tuple[int, ...]) -> StageSpec:
    n = len(model_plan(model, shape, CLASSES))
    return StageSpec(
        model=model,
        rule=RULE,
        optim=optim,
        input_shape=shape,
        num_classes=CLASSES,
        blocks=(0, n),
        dtype="float64",
        seed=3,
    )


def _stage_blocks(runner: LocalRunner) -> dict[str, nn.Module]:
    return {block.name: block for stage in runner.stages for block in stage.blocks}


def _plain_twin(model: ModelConfig, shape: tuple[int, ...], runner: LocalRunner) -> Plain:
    """Fresh blocks from the factories, loaded with the runner's initial weights."""
    owned = _stage_blocks(runner)
    blocks = []
    for name, factory in model_plan(model, shape, CLASSES):
        block = factory().to(torch.float64)
        block.load_state_dict(owned[name].state_dict())  # strict: the same tensors, no extras
        blocks.append(block)
    return Plain(blocks).train()


def _optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # nanoGPT's grouping: matrices and kernels decay, biases and norm affines do not
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _batches(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [
        (
            torch.randn(BATCH, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def _compare(
    model: ModelConfig,
    optim: OptimConfig,
    bounds: list[int] | None,
    micro_batches: int,
    shape: tuple[int, ...] = SHAPE,
) -> None:
    base = _spec(model, optim, shape)
    specs = stage_specs(base, bounds) if bounds else [base]
    runner = LocalRunner(specs)
    assert len(runner.stages) == (len(bounds) - 1 if bounds else 1)
    plain = _plain_twin(model, shape, runner)
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = _optimizer(optim, params)
    initial = [p.detach().clone() for p in params]

    for x, y in _batches(shape):
        ((logits_r, _),) = runner.step(x, y, micro_batches=micro_batches)
        logits_p = plain(x)
        loss = F.cross_entropy(logits_p, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(logits_r, logits_p.detach(), rtol=0, atol=ATOL)

    got = {
        f"{n}.{k}": v for n, b in _stage_blocks(runner).items() for k, v in b.state_dict().items()
    }
    want = {f"{b.name}.{k}": v for b in plain.blocks for k, v in b.state_dict().items()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=ATOL, msg=k)
    # the comparison is not between two untouched models: every parameter moved
    for i, (p, p0) in enumerate(zip(params, initial, strict=True)):
        assert not torch.allclose(p, p0, rtol=0, atol=1e-6), f"param {i} never moved"

    # optimizer state, parameter by parameter (same model-wide order on both sides)
    stage_params = [
        p for stage in runner.stages for p in stage.blocks.parameters() if p.requires_grad
    ]
    assert len(stage_params) == len(params)
    stage_state = {id(p): s for stage in runner.stages for p, s in stage.optimizer.state.items()}
    for i, (ps, pp) in enumerate(zip(stage_params, params, strict=True)):
        torch.testing.assert_close(ps, pp, rtol=0, atol=ATOL)
        mine, theirs = stage_state[id(ps)], opt.state[pp]
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in theirs:
                torch.testing.assert_close(
                    mine[key], theirs[key], rtol=0, atol=ATOL, msg=f"param {i} {key}"
                )


@pytest.mark.parametrize("optim", [ADAMW, SGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize(
    "bounds", [None, [0, 1, 3, 5], [0, 2, 4, 5]], ids=["1-stage", "3-stages-1-3", "3-stages-2-4"]
)
def test_backprop_stages_equal_plain_autograd(bounds, optim):
    _compare(RESNET, optim, bounds, micro_batches=1)


@pytest.mark.parametrize("bounds", [None, [0, 2, 3, 5]], ids=["1-stage", "3-stages"])
@pytest.mark.parametrize("optim", [ADAMW, SGD], ids=["adamw", "sgd"])
def test_backprop_micro_batches_equal_plain_full_batch(optim, bounds):
    """Two micro-batches, their sums averaged at one apply: the full batch's mean loss."""
    model = ModelConfig(name="resnet8", width=4, batchnorm=False)
    _compare(model, optim, bounds, micro_batches=2)


def test_backprop_mlp_residual_three_stages():
    model = ModelConfig(name="mlp", hidden=12, depth=4, gap=2, residual=True, batchnorm=True)
    _compare(model, ADAMW, [0, 1, 2, 3], micro_batches=1, shape=(2, 3, 3))
