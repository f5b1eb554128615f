"""Networks as ordered lists of blocks: an MLP and CIFAR/ImageNet-form ResNets of depth 8/18/34
(basic blocks) and 50/101 (bottleneck blocks, torchvision's v1.5: the stride on the 3x3)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from torch import nn

from workers.blocks import Block, Wire
from workers.bounds import Limits, check_bounds
from workers.layers import Conv, Dense, Layer, PooledHead

ModelName = Literal["mlp", "resnet8", "resnet18", "resnet34", "resnet50", "resnet101"]
MODELS = get_args(ModelName)
RESNET_LAYOUT = {  # residual blocks per stage
    "resnet8": (1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
BOTTLENECK = ("resnet50", "resnet101")  # 1x1 reduce, 3x3, 1x1 expand; the rest: basic blocks
EXPANSION = 4  # a bottleneck block's output channels over its 3x3's


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: ModelName = "resnet8"
    """The network: an MLP, or a ResNet of depth 8, 18 or 34 (basic blocks) or 50 or 101
    (bottleneck blocks, torchvision's v1.5)."""
    form: Literal["cifar", "imagenet"] = "cifar"
    """ResNets: cifar (3x3 stem) or imagenet (7x7 stride-2 stem and a max-pool)."""
    width: int = 16
    """ResNets: channels of the stem and of the first stage (doubling per stage); in a
    bottleneck ResNet, of the first stage's 3x3 convs (its blocks output 4x as many)."""
    hidden: int = 128
    """MLP: the hidden width."""
    depth: int = 2
    """MLP: hidden layers."""
    gap: int = 1
    """MLP: layers per block (the residual gap)."""
    residual: bool = False
    """MLP: an identity skip over each block whose input width matches."""
    act: Literal["relu", "tanh"] = "relu"
    """The hidden nonlinearity."""
    batchnorm: bool = True
    """BatchNorm after every conv or dense layer (part of the layer's forward map)."""
    zero_init_residual: bool = False
    """ResNets: each residual branch's last BatchNorm starts at scale 0, so every block starts
    as its shortcut (Goyal et al. 2017)."""

    # each numeric key's closed range (workers/bounds.py): widths far past ImageNet's 64, MLPs up to
    # 1,024 hidden layers (and blocks: pipeline.boundaries reaches 1,024)
    LIMITS: ClassVar[Limits] = {
        "width": (1, 4096),
        "hidden": (1, 65536),
        "depth": (1, 1024),
        "gap": (1, 1024),
    }

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model.name: {self.name!r} is not one of {list(MODELS)}")
        if self.form not in ("cifar", "imagenet"):
            raise ValueError(f"model.form: {self.form!r} is not one of ['cifar', 'imagenet']")
        if self.act not in ("relu", "tanh"):
            raise ValueError(f"model.act: {self.act!r} is not one of ['relu', 'tanh']")
        for key in ("width", "hidden", "depth", "gap"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        if self.depth % self.gap:
            raise ValueError(
                f"model.depth ({self.depth}) must be a multiple of model.gap ({self.gap})"
            )
        check_bounds("model", self, self.LIMITS)


BlockFactory = Callable[[], Block]


def model_plan(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> list[tuple[str, BlockFactory]]:
    """The model's blocks in order, as (name, factory) so a stage builds only the blocks it owns."""
    if cfg.name == "mlp":
        return _mlp(cfg, input_shape, num_classes)
    return _resnet(cfg, input_shape, num_classes)


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], k: int) -> list[tuple[str, BlockFactory]]:
    plan: list[tuple[str, BlockFactory]] = []
    d_in = math.prod(input_shape)
    for b in range(cfg.depth // cfg.gap):
        dims = [d_in] + [cfg.hidden] * cfg.gap
        shape_in = input_shape if b == 0 else (cfg.hidden,)

        def make(b: int = b, dims: list[int] = dims, shape_in: tuple[int, ...] = shape_in) -> Block:
            layers: dict[str, Layer] = {
                f"fc{i}": Dense(dims[i], dims[i + 1], batchnorm=cfg.batchnorm)
                for i in range(cfg.gap)
            }
            wires = [Wire(f"fc{i}", i - 1, i) for i in range(cfg.gap)]
            identity = [(-1, cfg.gap - 1)] if cfg.residual and dims[0] == cfg.hidden else []
            return Block(
                f"dense{b}",
                layers,
                wires,
                [cfg.act] * cfg.gap,
                identity=identity,
                in_shape=shape_in,
                node_shapes=[(cfg.hidden,)] * cfg.gap,
            )

        plan.append((f"dense{b}", make))
        d_in = cfg.hidden
    plan.append(("head", lambda: _head(cfg.hidden, (cfg.hidden,), k)))
    return plan


def _head(c: int, in_shape: tuple[int, ...], k: int) -> Block:
    return Block(
        "head",
        {"fc": PooledHead(c, k)},
        [Wire("fc", -1, 0)],
        ["identity"],
        head=True,
        in_shape=in_shape,
        node_shapes=[(k,)],
    )


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _resnet(
    cfg: ModelConfig, input_shape: tuple[int, ...], k: int
) -> list[tuple[str, BlockFactory]]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model.name: {cfg.name} needs image input (C, H, W), got shape {input_shape}"
        )
    c_in, h, w = input_shape
    bn = cfg.batchnorm
    plan: list[tuple[str, BlockFactory]] = []
    imagenet = cfg.form == "imagenet"
    kernel, stride, pad = (7, 2, 3) if imagenet else (3, 1, 1)
    hs, ws = _conv_out(h, kernel, stride, pad), _conv_out(w, kernel, stride, pad)
    stem_shape = (cfg.width, hs, ws)

    def stem() -> Block:
        conv = Conv(c_in, cfg.width, kernel, stride=stride, padding=pad, batchnorm=bn)
        return Block(
            "stem",
            {"conv": conv},
            [Wire("conv", -1, 0)],
            [cfg.act],
            out_pool=imagenet,
            in_shape=input_shape,
            node_shapes=[stem_shape],
        )

    plan.append(("stem", stem))
    shape = stem_shape
    if imagenet:
        shape = (cfg.width, _conv_out(hs, 3, 2, 1), _conv_out(ws, 3, 2, 1))
    bottleneck = cfg.name in BOTTLENECK
    for s, n_blocks in enumerate(RESNET_LAYOUT[cfg.name]):
        c_mid = cfg.width * 2**s
        c_out = c_mid * EXPANSION if bottleneck else c_mid
        for b in range(n_blocks):
            st = 2 if (s > 0 and b == 0) else 1
            out_shape = (c_out, _conv_out(shape[1], 3, st, 1), _conv_out(shape[2], 3, st, 1))
            name = f"layer{s + 1}.{b}"
            if bottleneck:
                make = _bottleneck_factory(name, shape, c_mid, out_shape, st, cfg)
            else:
                make = _basic_block_factory(name, shape, out_shape, st, cfg)
            plan.append((name, make))
            shape = out_shape
    last = shape

    def head() -> Block:
        return _head(last[0], last, k)

    plan.append(("head", head))
    return plan


def _residual(
    layers: dict[str, Layer],
    wires: list[Wire],
    last: str,
    c_in: int,
    c_out: int,
    stride: int,
    cfg: ModelConfig,
) -> list[tuple[int, int]]:
    """A residual block's join onto its last node (the one `last` feeds): a 1x1 projection
    `shortcut` (with the stride) when the shape changes, added to `layers` and `wires`, else the
    identity, returned. zero_init_residual zeroes `last`'s BatchNorm scale."""
    last_bn = layers[last].bn
    if cfg.zero_init_residual and isinstance(last_bn, nn.BatchNorm2d):
        nn.init.zeros_(last_bn.weight)
    node = wires[-1].tgt
    if stride != 1 or c_in != c_out:
        layers["shortcut"] = Conv(c_in, c_out, 1, stride=stride, padding=0, batchnorm=cfg.batchnorm)
        wires.append(Wire("shortcut", -1, node, shortcut=True))
        return []
    return [(-1, node)]


def _basic_block_factory(
    name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], stride: int, cfg: ModelConfig
) -> BlockFactory:
    def make() -> Block:
        c_in, c_out, bn = in_shape[0], out_shape[0], cfg.batchnorm
        layers: dict[str, Layer] = {
            "conv1": Conv(c_in, c_out, 3, stride=stride, padding=1, batchnorm=bn),
            "conv2": Conv(c_out, c_out, 3, stride=1, padding=1, batchnorm=bn),
        }
        wires = [Wire("conv1", -1, 0), Wire("conv2", 0, 1)]
        identity = _residual(layers, wires, "conv2", c_in, c_out, stride, cfg)
        return Block(
            name,
            layers,
            wires,
            [cfg.act, cfg.act],
            identity=identity,
            in_shape=in_shape,
            node_shapes=[out_shape, out_shape],
        )

    return make


def _bottleneck_factory(
    name: str,
    in_shape: tuple[int, ...],
    c_mid: int,
    out_shape: tuple[int, ...],
    stride: int,
    cfg: ModelConfig,
) -> BlockFactory:
    """A bottleneck block (torchvision's v1.5): conv1 1x1 to c_mid, conv2 3x3 carrying the
    stride, conv3 1x1 to c_out; the identity, or a 1x1 projection `shortcut` (with the stride)
    when the shape changes, joins conv3 before the last activation. Three nodes in a chain,
    the same graph the rules already walk for a basic block, one node longer."""

    def make() -> Block:
        c_in, c_out, bn = in_shape[0], out_shape[0], cfg.batchnorm
        mid_in = (c_mid, *in_shape[1:])  # conv1 keeps the input's size
        mid_out = (c_mid, *out_shape[1:])
        layers: dict[str, Layer] = {
            "conv1": Conv(c_in, c_mid, 1, stride=1, padding=0, batchnorm=bn),
            "conv2": Conv(c_mid, c_mid, 3, stride=stride, padding=1, batchnorm=bn),
            "conv3": Conv(c_mid, c_out, 1, stride=1, padding=0, batchnorm=bn),
        }
        wires = [Wire("conv1", -1, 0), Wire("conv2", 0, 1), Wire("conv3", 1, 2)]
        identity = _residual(layers, wires, "conv3", c_in, c_out, stride, cfg)
        return Block(
            name,
            layers,
            wires,
            [cfg.act] * 3,
            identity=identity,
            in_shape=in_shape,
            node_shapes=[mid_in, mid_out, out_shape],
        )

    return make
