"""Auxiliary heads: what a decoupled stage learns from (rec-LRA's `decoupled` topology).

A stage below the top carries, on its output, a small classifier of its own (as in decoupled
greedy learning, InfoPro and SEDONA) and optionally a decoder that reconstructs the stage's
input (an information-preserving term, after InfoPro). They are blocks like any other: the rule
learns them with their own error synapses, and their errors reach the stage's top through
those synapses, so the stage learns the moment its own forward is done and nothing crosses a
stage boundary backwards. The model's prediction is the top stage's own head; an auxiliary
head's accuracy is the early-exit accuracy of its stage.

Every name is model-wide and keyed by the block the head sits on (`aux.layer1.0.head.fc`), so
a checkpoint keeps each boundary's head, and a resume that cuts elsewhere starts fresh heads
where a boundary is new (Stage.load_state_dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.blocks import Block, Wire
from workers.layers import Conv, Dense, Layer, PooledHead
from workers.models import ModelConfig
from workers.rules import RuleConfig

REC_WIDTH = 12  # the decoder's hidden channels (InfoPro's decoder)


@dataclass
class AuxBlocks:
    """A decoupled stage's auxiliary blocks: its classifier chain (ending in a head block) and
    the reconstruction decoder chain (empty when rule.aux_recon is 0)."""

    head: list[Block]
    recon: list[Block]


def _conv_block(name: str, c_in: int, c_out: int, k: int, stride: int, shape, act: str, bn: bool):
    h, w = shape[1], shape[2]
    pad = k // 2
    out = (c_out, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
    layer = Conv(c_in, c_out, k, stride=stride, padding=pad, batchnorm=bn)
    return Block(
        name, {"conv": layer}, [Wire("conv", -1, 0)], [act], in_shape=shape, node_shapes=[out]
    ), out


def _dense_block(name: str, d_in: int, d_out: int, shape, act: str, bn: bool):
    layers: dict[str, Layer] = {"fc": Dense(d_in, d_out, batchnorm=bn)}
    out = (d_out,)
    return Block(name, layers, [Wire("fc", -1, 0)], [act], in_shape=shape, node_shapes=[out]), out


def head_blocks(
    top: str, shape: tuple[int, ...], inner: int, classes: int, kind: str, model: ModelConfig
) -> list[Block]:
    """The classifier on the output (of `shape`) of block `top`: `kind` is rule.aux_head.
    Its hidden layers are sized by `inner`, the channels of the top block's narrowest node (C
    in docs/algorithm.md's "2C"): a basic block's output width, a bottleneck's 3x3 width, so a
    head on a bottleneck costs about what it costs on a basic block of the same inner width,
    not 16 times as much."""
    prefix, act, bn = f"aux.{top}", model.act, model.batchnorm
    blocks: list[Block] = []
    spatial = len(shape) == 3
    if kind != "linear":
        c = shape[0]
        if not spatial:  # a dense network: a hidden dense layer in place of the conv
            block, shape = _dense_block(f"{prefix}.c0", c, inner, shape, act, bn)
            blocks.append(block)
        elif kind == "pointwise":
            block, shape = _conv_block(f"{prefix}.c0", c, 2 * inner, 1, 1, shape, act, bn)
            blocks.append(block)
        else:
            stride = 2 if min(shape[1], shape[2]) >= 8 else 1
            width = 2 * inner if stride == 2 else inner
            block, shape = _conv_block(f"{prefix}.c0", c, width, 3, stride, shape, act, bn)
            blocks.append(block)
            if kind == "conv2":
                block, shape = _conv_block(f"{prefix}.c1", width, width, 3, 1, shape, act, bn)
                blocks.append(block)
    head = Block(
        f"{prefix}.head",
        {"fc": PooledHead(shape[0], classes)},
        [Wire("fc", -1, 0)],
        ["identity"],
        head=True,
        in_shape=shape,
        node_shapes=[(classes,)],
    )
    return [*blocks, head]


def recon_blocks(
    top: str, shape: tuple[int, ...], input_shape: tuple[int, ...], model: ModelConfig
) -> list[Block]:
    """A decoder from the output (of `shape`) of block `top` to the stage's input, average-
    pooled to the output's size: 3x3 conv to REC_WIDTH, BN, act, then a 3x3 conv to the
    input's channels (a linear output; its error is the reconstruction's)."""
    prefix = f"aux.{top}"
    if len(shape) != 3 or len(input_shape) != 3:
        hidden, out_shape = _dense_block(
            f"{prefix}.r0", shape[0], REC_WIDTH, shape, model.act, model.batchnorm
        )
        last_layer: Layer = Dense(REC_WIDTH, math.prod(input_shape))
        rec_shape: tuple[int, ...] = (math.prod(input_shape),)
    else:
        hidden, out_shape = _conv_block(
            f"{prefix}.r0", shape[0], REC_WIDTH, 3, 1, shape, model.act, model.batchnorm
        )
        last_layer = Conv(REC_WIDTH, input_shape[0], 3, stride=1, padding=1)
        rec_shape = (input_shape[0], shape[1], shape[2])
    out = Block(
        f"{prefix}.rec",
        {"conv": last_layer},
        [Wire("conv", -1, 0)],
        ["identity"],
        head=True,
        in_shape=out_shape,
        node_shapes=[rec_shape],
    )
    return [hidden, out]


def aux_blocks(
    top: Block,
    input_shape: tuple[int, ...],
    classes: int,
    rule: RuleConfig,
    model: ModelConfig,
) -> AuxBlocks:
    """The auxiliary blocks of a decoupled stage whose top block is `top` and whose input has
    `input_shape`."""
    shape = top.out_shape
    head = head_blocks(top.name, shape, top.narrowest, classes, rule.aux_head, model)
    recon = recon_blocks(top.name, shape, input_shape, model) if rule.aux_recon > 0 else []
    return AuxBlocks(head, recon)
