"""A stage's blocks, built from the model plan and equipped with the error synapses its rule asks
for; their learnable units by model-wide name, and which parameters learn by which rate."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from workers.aux_heads import AuxBlocks, aux_blocks
from workers.blocks import Block
from workers.layers import init_weight_
from workers.models import model_plan
from workers.rules import Rule, rule_chained, rule_decoupled
from workers.spec import DTYPES, StageSpec
from workers.synapses import SkipSynapse


def build_blocks(spec: StageSpec, rule: Rule) -> tuple[nn.ModuleList, bool, bool]:
    """Blocks [first, last) of the model, equipped, on the spec's device and dtype; and whether
    they are the model's first and last. Tells `rule` the top block of its stage."""
    plan = model_plan(spec.model, spec.input_shape, spec.num_classes)
    first, last = spec.blocks
    if not 0 <= first < last <= len(plan):
        raise ValueError(
            f"pipeline: blocks [{first}, {last}) outside the model's {len(plan)} blocks"
        )
    rule.stage_top = plan[last - 1][0] if last < len(plan) else None
    chained = rule_chained(spec.rule)
    blocks = nn.ModuleList()
    for i in range(first, last):
        block = plan[i][1]()
        # nothing below the model's input, nor below a stage that sends no boundary down
        bottom = i == 0 or (i == first and not chained)
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        equip(block, rule, spec, gen, bottom)
        blocks.append(block)
    blocks.to(device=torch.device(spec.device), dtype=DTYPES[spec.dtype])
    return blocks, first == 0, last == len(plan)


def build_aux(spec: StageSpec, rule: Rule, trunk: list[Block], is_last: bool) -> AuxBlocks | None:
    """The auxiliary head (and decoder) of a decoupled stage below the top, equipped and on the
    spec's device and dtype; None for any other stage. Each draws its weights from its own
    name, so a head is the same whichever stages the model is cut into."""
    if is_last or not rule_decoupled(spec.rule):
        return None
    aux = aux_blocks(trunk[-1], trunk[0].in_shape, spec.num_classes, spec.rule, spec.model)
    for block in [*aux.head, *aux.recon]:
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + zlib.crc32(block.name.encode()))
        equip(block, rule, spec, gen, bottom=False)
        block.to(device=torch.device(spec.device), dtype=DTYPES[spec.dtype])
    return aux


def equip(block: Block, rule: Rule, spec: StageSpec, gen: torch.Generator, bottom: bool) -> None:
    """Initialise the block's weights and add the error synapses `rule` asks for (none that
    would carry an error below `bottom`)."""
    cfg = spec.rule
    for wire in block.wires:
        layer = block.layer(wire.layer)
        init_weight_(layer.weight, cfg.head_init if block.head else cfg.init, cfg.init_std, gen)
        mode = rule.feedback_mode(block, wire)
        if wire.src < 0 and bottom:
            mode = None  # would carry an error nobody reads (the data, or a broadcast stage)
        layer.feedback_mode = mode
        if mode is not None:
            layer.add_feedback(trainable=mode != "fixed")
            assert layer.feedback is not None
            scheme = cfg.kp_init if mode == "kp" else cfg.feedback_init
            if block.head and mode == "kp" and cfg.head_init == "zeros":
                scheme = "zeros"  # with W_head at zero too, E_head = gamma * W_head always
            init_weight_(layer.feedback, scheme, cfg.init_std, gen)
    for n, shape in enumerate(block.node_shapes):
        mode = rule.skip_mode(block, n)
        if mode is not None:
            syn = SkipSynapse(spec.num_classes, shape, cfg.skip_grid)
            scheme = cfg.kp_init if mode == "kp" else cfg.feedback_init
            init_weight_(syn.weight, scheme, cfg.init_std, gen)
            syn.weight.requires_grad_(mode != "fixed")
            block.skips[str(n)] = syn


def block_units(blocks: list[Block]) -> dict[str, nn.Module]:
    """Every learnable unit by its model-wide name: layers and skip synapses."""
    out: dict[str, nn.Module] = {}
    for block in blocks:
        for lname, layer in block.layer_items():
            out[f"{block.name}.{lname}"] = layer
        for n, syn in block.skips.items():
            out[f"{block.name}.skip{n}"] = syn
    return out


def trainable(blocks: nn.ModuleList) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(forward parameters, error synapses) of `blocks` that learn."""
    feedback: list[nn.Parameter] = []
    for block in blocks:
        assert isinstance(block, Block)
        feedback += [ly.feedback for _, ly in block.layer_items() if ly.feedback is not None]
        feedback += [block.skip(int(n)).weight for n in block.skips]
    feedback = [p for p in feedback if p.requires_grad]
    ids = {id(p) for p in feedback}
    forward = [p for p in blocks.parameters() if p.requires_grad and id(p) not in ids]
    return forward, feedback


def named_parameters(units: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """(model-wide parameter name, parameter) of every unit."""
    return [
        (f"{name}.{pname}", p)
        for name, unit in units.items()
        for pname, p in unit.named_parameters()
    ]


def kp_pairs(blocks: list[Block]) -> list[tuple[nn.Parameter | None, nn.Parameter]]:
    """(error synapse E, forward weight W) of every layer whose E learns by KP."""
    return [
        (layer.feedback, layer.weight)
        for block in blocks
        for _, layer in block.layer_items()
        if layer.feedback_mode == "kp"
    ]
