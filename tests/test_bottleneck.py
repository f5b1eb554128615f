"""Bottleneck ResNets (ResNet-50 and ResNet-101, torchvision's v1.5) as graphs the rules walk.

(a) Shapes: every block's declared node and output shapes are what its forward computes, in
    CIFAR form (32x32) and ImageNet form (64x64), with a small width.
(b) The ImageNet-form ResNet-50 at width 64 with 1,000 classes has torchvision's parameter
    count (25,557,032), and its weights, under torchvision's names (convN -> convN + bnN, the
    projection shortcut -> downsample.0/1, stem -> conv1 + bn1, head -> fc), load into
    torchvision.models.resnet50 with strict=True and give the same logits.
(c) One training step of every rule (rec_lra in each topology, lra_e, fa, kp, sign, dfa,
    backprop) on a small ResNet-50 cut into two stages: finite losses, finite weights that moved.
(d) K = 2 and 3 partitions (balanced from a real profile, and explicit) cut only between
    bottleneck blocks: each block's three convs (and its shortcut) sit in one stage.
(e) The in-process pipeline on K = 2 and 3 stages trains a deterministic rule (rec-LRA
    mirror, backprop) to the weights one stage reaches (float64).
(f) The memory estimate counts a bottleneck ResNet's weights, synapses and moments exactly.
(g) bench.scaling's ResNet-50 arithmetic is the model's own, its block profile runs on it, and
    the weight mirror handles a 3x3 at stride 2 on a 2x2 map (ImageNet form at 32x32);
    bench.pipeline offers resnet50_64 and refuses an unknown model by name.
(h) A decoupled stage's auxiliary head on a bottleneck is sized by its 3x3 width.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from driver.config import parse_config, with_rule
from driver.config.pipeline import PipelineConfig
from driver.pipeline.partition import plan_partition
from driver.pipeline.stream import LocalPipeline
from driver.run.memory import data_shape, estimate_memory, model_blocks
from workers.aux_heads import aux_blocks
from workers.blocks import Block
from workers.chain import LocalRunner, stage_specs
from workers.layers import Conv, init_weight_
from workers.mirror import estimate, noise_samples
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

CLASSES = 10
RANDOM: dict[str, Any] = dict(kp_init="kaiming", head_init="kaiming")  # all synapses move


def _blocks(model: ModelConfig, shape: tuple[int, ...], classes: int = CLASSES) -> list[Block]:
    """The model's blocks with Kaiming weights (a plan's layers are uninitialised until a
    stage equips them)."""
    blocks = [make() for _, make in model_plan(model, shape, classes)]
    gen = torch.Generator().manual_seed(0)
    for block in blocks:
        for _, layer in block.layer_items():
            init_weight_(layer.weight, "kaiming", 1.0, gen)
    return blocks


# -- (a) shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, form, hw, n_blocks",
    [
        ("resnet50", "cifar", 32, 18),
        ("resnet50", "imagenet", 64, 18),
        ("resnet101", "cifar", 32, 35),
        ("resnet101", "imagenet", 64, 35),
    ],
)
def test_shapes_follow_the_declared_node_shapes(name, form, hw, n_blocks):
    model = ModelConfig(name=name, form=form, width=4)
    blocks = _blocks(model, (3, hw, hw))
    assert len(blocks) == n_blocks
    x = torch.randn(2, 3, hw, hw)
    for block in blocks:
        assert tuple(x.shape[1:]) == block.in_shape, block.name
        out, cache = block.forward_local(x)
        for n, z in enumerate(cache.z):
            assert tuple(z.shape[1:]) == block.node_shapes[n], (block.name, n)
        assert tuple(out.shape[1:]) == block.out_shape, block.name
        torch.testing.assert_close(block(x), out)  # the two forwards agree
        x = out
    assert x.shape == (2, CLASSES)
    # torchvision's v1.5: conv2 (3x3) carries the stride, conv1 and conv3 are 1x1; 4x expansion
    first = {b.name: b for b in blocks}["layer2.0"]
    assert [first.layer(n).weight.shape[-1] for n in ("conv1", "conv2", "conv3")] == [1, 3, 1]
    assert [first.layer(n).stride for n in ("conv1", "conv2", "conv3", "shortcut")] == [1, 2, 1, 2]
    assert first.out_shape[0] == 4 * first.node_shapes[1][0] == 4 * 8
    # the shortcut is a projection exactly where the shape changes (the first block of a stage)
    for block in blocks[1:-1]:
        projected = block.name.endswith(".0")
        assert ("shortcut" in block.layers) == projected, block.name
        assert (block.identity == [(-1, 2)]) == (not projected), block.name


def test_zero_init_residual_zeroes_the_last_batchnorm():
    model = ModelConfig(name="resnet50", width=4, zero_init_residual=True)
    for block in _blocks(model, (3, 16, 16))[1:-1]:
        assert torch.count_nonzero(block.layer("conv3").bn.weight) == 0  # type: ignore[union-attr]
        assert torch.count_nonzero(block.layer("conv2").bn.weight) > 0  # type: ignore[union-attr]


# -- (b) torchvision ------------------------------------------------------------------------------


def _torchvision_key(name: str) -> str:
    """A reclra parameter or buffer name (block.layer.[bn.]tensor) under torchvision's scheme."""
    if name.startswith("stem.conv."):
        name = name.replace("stem.conv.bn.", "bn1.").replace("stem.conv.", "conv1.")
        return name
    if name.startswith("head.fc."):
        return name.removeprefix("head.")
    m = re.fullmatch(r"(layer\d\.\d+)\.(conv(\d)|shortcut)\.(bn\.)?(\w+)", name)
    assert m is not None, name
    block, layer, index, bn, tensor = m.groups()
    if layer == "shortcut":
        module = "downsample.1" if bn else "downsample.0"
    else:
        module = f"bn{index}" if bn else layer
    return f"{block}.{module}.{tensor}"


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_imagenet_form_matches_torchvision(name):
    model = ModelConfig(name=name, form="imagenet", width=64)
    blocks = _blocks(model, (3, 224, 224), 1000)
    net = nn.Sequential(*blocks).eval()
    reference = getattr(torchvision.models, name)().eval()
    count = sum(p.numel() for p in net.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    if name == "resnet50":
        assert count == 25_557_032
    state = {}
    for block in blocks:
        for key, t in block.state_dict().items():
            state[_torchvision_key(f"{block.name}.{key.removeprefix('layers.')}")] = t
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is really compared
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        for block in blocks:
            for key, t in block.state_dict().items():
                t.copy_(
                    reference.state_dict()[
                        _torchvision_key(f"{block.name}.{key.removeprefix('layers.')}")
                    ]
                )
        x = torch.randn(2, 3, 48, 48)
        torch.testing.assert_close(net(x), reference(x), rtol=1e-4, atol=1e-4)


# -- (c) every rule, one step --------------------------------------------------------------------

SMALL = ModelConfig(name="resnet50", width=4)
SHAPE = (3, 16, 16)
N_BLOCKS = 18
RULES = {
    "rec_lra-mirror": dict(name="rec_lra"),
    "rec_lra-mirror-local": dict(name="rec_lra", feedback_update="local", skip_update="local"),
    "rec_lra-adjacent": dict(name="rec_lra", topology="adjacent", **RANDOM),
    "rec_lra-skip": dict(name="rec_lra", topology="skip", **RANDOM),
    "rec_lra-stage": dict(name="rec_lra", topology="stage", **RANDOM),
    "rec_lra-decoupled": dict(name="rec_lra", topology="decoupled", aux_recon=0.5, **RANDOM),
    "rec_lra-paper": dict(name="rec_lra", preset="paper"),
    "lra_e": dict(name="lra_e", **RANDOM),
    "fa": dict(name="fa"),
    "kp": dict(name="kp", **RANDOM),
    "sign": dict(name="sign"),
    "dfa": dict(name="dfa"),
    "backprop": dict(name="backprop"),
}


def _base(rule: RuleConfig, dtype: str = "float32") -> StageSpec:
    assert len(model_plan(SMALL, SHAPE, CLASSES)) == N_BLOCKS
    return StageSpec(
        model=SMALL,
        rule=rule,
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, total_steps=10),
        input_shape=SHAPE,
        num_classes=CLASSES,
        blocks=(0, N_BLOCKS),
        dtype=dtype,
    )


def _batch(size: int = 8, seed: int = 0, dtype=torch.float32):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(size, *SHAPE, generator=g, dtype=dtype),
        torch.randint(0, CLASSES, (size,), generator=g),
    )


def _units(runner) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {
        f"{u}.{k}": t
        for u, entry in runner.state_dict()["units"].items()
        for k, t in entry["tensors"].items()
    }


@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_one_step_of_every_rule(rule):
    runner = LocalRunner(stage_specs(_base(RuleConfig(**rule)), [0, 8, N_BLOCKS]))
    before = {k: t.clone() for k, t in _units(runner).items()}
    x, y = _batch()
    ((logits, labels),) = runner.step(x, y, 2)
    loss = nn.functional.cross_entropy(logits, labels)
    assert math.isfinite(loss.item())
    for _, stats in runner.drain_stats():
        if rule["name"] not in ("backprop", "fa", "kp", "sign"):  # autograd: no node losses
            assert stats.local_loss, "a stage reported no node loss"
        assert all(math.isfinite(v) for v in stats.local_loss.values()), stats.local_loss
        assert stats.update_norm and all(math.isfinite(v) for v in stats.update_norm.values())
    after = _units(runner)
    assert all(torch.isfinite(t).all() for t in after.values())
    for layer in ("layer1.0.conv1", "layer2.3.conv3", "layer4.2.conv2", "head.fc"):
        key = f"{layer}.weight"
        assert not torch.equal(before[key], after[key]), f"{key} did not learn"
    if rule["name"] in ("rec_lra", "lra_e", "kp") and rule.get("topology") != "skip":
        # a learning error synapse on the 1x1 expand conv (a weight mirror or KP from step one)
        assert "layer3.1.conv3.feedback" in after


# -- (d) partitions cut between bottleneck blocks ------------------------------------------------


def _stage_layers(spec: StageSpec) -> dict[str, set[str]]:
    plan = model_plan(spec.model, spec.input_shape, spec.num_classes)
    first, last = spec.blocks
    return {name: set(make().layers) for name, make in plan[first:last]}


@pytest.mark.parametrize("k", [2, 3])
def test_partition_cuts_between_bottleneck_blocks(k):
    base = _base(RuleConfig(name="rec_lra"))
    names = tuple(name for name, _ in model_plan(SMALL, SHAPE, CLASSES))
    part = plan_partition(base, k, (), _batch(4), 1, names=names)
    assert len(part.bounds) == k + 1 and part.bounds[0] == 0 and part.bounds[-1] == N_BLOCKS
    explicit = plan_partition(base, k, (4, 11)[: k - 1], None, 1, names=names)
    for bounds in (part.bounds, explicit.bounds):
        seen: list[str] = []
        for spec in stage_specs(base, list(bounds)):
            for block, layers in _stage_layers(spec).items():
                if block.startswith("layer"):  # a whole bottleneck in this one stage
                    assert {"conv1", "conv2", "conv3"} <= layers, (block, layers)
                seen.append(block)
        assert seen == list(names)  # every block once, in order
        for cut in bounds[1:-1]:
            assert re.fullmatch(r"layer\d\.\d+|head", names[cut]), names[cut]


# -- (e) the in-process pipeline equals one stage ----------------------------------------------


@pytest.mark.parametrize(
    "rule, bounds",
    [
        (RuleConfig(name="rec_lra", mirror_angle=20.0, **RANDOM), [0, 6, N_BLOCKS]),
        (RuleConfig(name="backprop"), [0, 4, 11, N_BLOCKS]),
    ],
    ids=["mirror-k2", "backprop-k3"],
)
def test_in_process_pipeline_equals_one_stage(rule, bounds):
    base = _base(rule, dtype="float64")
    one = LocalRunner([base])
    pipe = LocalPipeline(stage_specs(base, bounds), PipelineConfig(stages=len(bounds) - 1))
    for step in range(2):
        x, y = _batch(6, seed=step, dtype=torch.float64)
        one.step(x, y, 2)
        pipe.step(x, y, 2)
    pipe.flush()
    a, b = _units(one), _units(pipe)
    start = _units(LocalRunner([base]))
    assert not torch.equal(a["layer3.0.conv2.weight"], start["layer3.0.conv2.weight"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-10, msg=key)


# -- (f) the memory estimate -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rec_lra", "rec_lra_decoupled", "dfa", "kp", "backprop"])
def test_memory_estimate_counts_what_the_stages_build(variant):
    """driver/run/memory.py counts a bottleneck ResNet's weights, error synapses and optimizer
    moments exactly as its K = 2 stages hold them, and a run's peak grows with the depth."""
    text = (
        '[model]\nname = "resnet50"\nwidth = 4\n'
        '[data]\nname = "synthetic"\nsynthetic_shape = [3, 16, 16]\n'
        '[pipeline]\nstages = 2\nbackend = "ray"\nboundaries = [8]\n'
    )
    cfg = with_rule(parse_config(text, []), variant)
    assert model_blocks(cfg) == N_BLOCKS
    est = estimate_memory(cfg)
    assert len(est.stages) == 2
    shape, classes = data_shape(cfg.data)
    base = StageSpec(
        model=cfg.model,
        rule=cfg.rule,
        optim=cfg.optim,
        input_shape=shape,
        num_classes=classes,
        blocks=(0, N_BLOCKS),
        keep_freed_memory=False,
    )
    moments = 2 if cfg.optim.name == "adamw" else 1
    for proc, spec in zip(est.stages, stage_specs(base, [0, 8, N_BLOCKS]), strict=True):
        stage = Stage(spec)
        held = sum(p.numel() for p in stage.blocks.parameters())
        held += sum(b.numel() for b in stage.blocks.buffers())
        learned = sum(p.numel() for g in stage.optimizer.param_groups for p in g["params"])
        assert proc.resident["weights"] + proc.resident["error synapses"] == 4 * held
        assert proc.resident["optimizer"] == 4 * learned * moments
    deeper = estimate_memory(with_rule(parse_config(text, ['model.name="resnet101"']), variant))
    assert deeper.total > est.total


# -- (g) the benchmarks' ResNet-50 -------------------------------------------------------------


def test_scaling_arithmetic_is_the_models_own():
    """bench/scaling/project.resnet_blocks (the MACs and boundary sizes the projections use)
    describes workers/models.py's ImageNet-form ResNet-50 block for block."""
    from bench.scaling.project import resnet_blocks

    blocks = _blocks(ModelConfig(name="resnet50", form="imagenet", width=64), (3, 224, 224), 1000)
    arithmetic = resnet_blocks("resnet50")
    assert [b["name"] for b in arithmetic] == [b.name for b in blocks]
    for block, row in zip(blocks, arithmetic, strict=True):
        macs = sum(
            block.layer(w.layer).weight.numel() * math.prod(block.node_shapes[w.tgt][1:])
            for w in block.wires
        )
        assert row["macs"] == macs, block.name
        assert row["out"] == math.prod(block.out_shape), block.name


@pytest.mark.parametrize("rule", ["rec_lra:topology=skip", "rec_lra", "backprop"])
def test_scaling_profiles_resnet50_blocks(rule):
    """bench.scaling's block profile (what --measure-profile times) runs on ResNet-50."""
    from bench.scaling.profile import config_of, profile_blocks

    overrides = [
        "model.name=resnet50",
        'model.form="imagenet"',
        "model.width=4",
        "data.name=synthetic",
        "data.synthetic_shape=[3, 32, 32]",
        "data.synthetic_size=64",
        "train.batch_size=4",
        "pipeline.micro_batches=1",
    ]
    prof = profile_blocks(config_of(overrides, rule), reps=1, micro_batches=1)
    assert len(prof.names) == len(prof.forward) == len(prof.learn) == N_BLOCKS
    assert all(t > 0 for t in prof.forward + prof.learn)
    assert prof.out_bytes[1] == 4 * 4 * 16 * 8 * 8  # layer1.0: 4 x width channels at 8x8


def test_weight_mirror_on_a_map_smaller_than_the_kernel_reach():
    """A ResNet-50's layer4.0.conv2 on a 32x32 ImageNet-form input is a 3x3 at stride 2 on a
    2x2 map: its first row and column of taps only ever meet padding. The mirror estimates the
    taps that see the input (near W) and leaves the others at 0, with no division by zero."""
    layer = Conv(16, 16, 3, stride=2, padding=1)
    gen = torch.Generator().manual_seed(0)
    init_weight_(layer.weight, "kaiming", 1.0, gen)
    src = (16, 2, 2)
    n = noise_samples(layer, src, 10.0)
    est = estimate(layer, src, n, gen)
    assert torch.isfinite(est).all()
    assert torch.count_nonzero(est[:, :, 0, :]) == torch.count_nonzero(est[:, :, :, 0]) == 0
    seen_est, seen_w = est[:, :, 1:, 1:].flatten(), layer.weight[:, :, 1:, 1:].flatten()
    cos = torch.dot(seen_est, seen_w) / (seen_est.norm() * seen_w.norm())
    assert math.degrees(math.acos(cos.clamp(-1, 1).item())) < 15.0


def test_bench_pipeline_offers_resnet50_and_refuses_unknown_models(tmp_path, capsys):
    """bench.pipeline's resnet50_64 is the ImageNet-form ResNet-50 at width 64; an unknown
    --models entry is refused by name before anything starts."""
    from bench.pipeline import MODELS
    from bench.pipeline import main as bench_main
    from driver.config import load_config

    cfg = load_config(None, [*MODELS["resnet50_64"], "train.compare=[]"])
    assert (cfg.model.name, cfg.model.form, cfg.model.width) == ("resnet50", "imagenet", 64)
    assert len(model_plan(cfg.model, (3, 64, 64), 10)) == N_BLOCKS
    with pytest.raises(SystemExit):
        bench_main(["--json", str(tmp_path / "r.json"), "--models", "resnet50_64,resnet99"])
    assert "resnet99" in capsys.readouterr().err


def _macs(blocks: list[Block]) -> int:
    return sum(
        block.layer(w.layer).weight.numel() * math.prod(block.node_shapes[w.tgt][1:])
        for block in blocks
        for w in block.wires
    )


def test_auxiliary_heads_are_sized_by_the_bottleneck_width():
    """A decoupled stage's head on a bottleneck is sized by the block's 3x3 width (its
    narrowest node), as on a basic block by its output width: the conv2 head on ResNet-50's
    layer3 is 7.6M parameters, not 58.7M, and bench.scaling charges exactly its MACs."""
    from bench.scaling.project import aux_head_macs

    rule = RuleConfig(name="rec_lra", topology="decoupled")
    model = ModelConfig(name="resnet50", form="imagenet", width=64)
    plan = {b.name: b for b in _blocks(model, (3, 224, 224), 1000)}
    for name in ("stem", "layer1.1", "layer2.0", "layer3.5", "layer4.2"):
        top = plan[name]
        head = aux_blocks(top, (3, 224, 224), 1000, rule, model).head
        c, h, _ = top.out_shape
        assert _macs(head) == aux_head_macs(c, h, top.narrowest), name
    layer3 = aux_blocks(plan["layer3.5"], (3, 224, 224), 1000, rule, model).head
    assert plan["layer3.5"].narrowest == 256
    assert [b.layer("conv").weight.shape[:2] for b in layer3[:2]] == [(512, 1024), (512, 512)]
    params = sum(p.numel() for b in layer3 for p in b.parameters())
    assert 7.5e6 < params < 7.7e6  # 58.7M when sized by the 1,024-channel output
    # a basic block's head is what it always was: 2C on the block's output width C
    r34 = {b.name: b for b in _blocks(ModelConfig(name="resnet34", width=64), (3, 32, 32))}
    basic = aux_blocks(r34["layer2.0"], (3, 32, 32), CLASSES, rule, model).head
    assert basic[0].layer("conv").weight.shape[:2] == (256, 128)
