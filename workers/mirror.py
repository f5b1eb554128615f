"""Weight mirrors (Akrout et al. 2019): an error synapse learned from its own layer's response to
noise, so that E stands for Wᵀ from the first step without ever reading W.

A layer drives its own forward map with white noise x (unit variance) and correlates its input
with its output y = W x: E[weight_grad(x, W x)] = gain ⊙ W, where the gain is known from the
layer's shape alone (how many output positions each kernel tap sees, per sample). The mirror
estimate M = weight_grad(x, W x) / gain is therefore W in expectation. Only the layer's own input
and output are used: the quantities its Hebbian update correlates, here under noise.

How much noise: M's error relative to W is about sqrt(fan_in / n_eff), where n_eff is the
noise samples each weight sees (noise images times output positions), so the angle between M
and W is about atan(sqrt(fan_in / n_eff)). Each layer draws enough noise for `rule.mirror_angle`
degrees: a deep 3x3 conv on a small map needs many noise images, a shallow one on a large map
few, at about the same cost (the cost grows with fan_in² · C_out, not with the data).

At its first forward every stage sets each learning error synapse (`kp`, `local`; `fixed` ones
stay as drawn) to its mirror estimate, each stage on its own, so all at once in a pipeline.
`rule.mirror_every` then blends a fresh estimate in every N optimizer steps, at rate
`rule.mirror_rate`. Each layer's noise is seeded by the run's seed, the optimizer step and the
layer's name: it does not depend on how the model is cut into stages, and a resumed run draws
what an uninterrupted one would.
"""

from __future__ import annotations

import math
import zlib

import torch

from workers.blocks import Block
from workers.layers import Conv, Layer, PooledHead

CHUNK = 1 << 22  # noise values drawn at once (16 MiB in float32)


def _taps(layer: Conv, src_shape: tuple[int, ...]) -> torch.Tensor:
    """Per kernel tap, how many output positions put that tap inside the input (one sample):
    the weight correlation of an all-ones input with an all-ones output, one channel."""
    k = layer.weight.shape[-1]
    ones_in = torch.ones((1, 1, *src_shape[1:]), dtype=torch.float64)
    ones_out = torch.ones((1, 1, *layer.out_hw(*src_shape[1:])), dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        ones_out,
        ones_in,
        torch.zeros((1, 1, k, k), dtype=torch.float64),
        None,
        [layer.stride] * 2,
        [layer.padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        [False, True, False],
    )[1]


def noise_samples(layer: Layer, src_shape: tuple[int, ...], angle: float) -> int:
    """Noise samples the layer needs for its estimate to lie about `angle` degrees from W.

    A kernel tap that never lands inside the input (a 3x3 at stride 2 on a 2x2 map) only ever
    meets padding: it has no effect and nothing to estimate, so it sets no sample count."""
    fan_in = layer.weight[0].numel()
    per_sample = 1.0
    if isinstance(layer, Conv):
        taps = _taps(layer, src_shape)
        per_sample = float(taps[taps > 0].min())
    return max(1, math.ceil(fan_in / (math.tan(math.radians(angle)) ** 2 * per_sample)))


@torch.no_grad()
def estimate(
    layer: Layer, src_shape: tuple[int, ...], n: int, gen: torch.Generator
) -> torch.Tensor:
    """One weight-mirror estimate of W from n unit-noise samples through the layer's own map.

    The pooled head's map averages its input over H x W before its matrix, so its noise is drawn
    at the pooled features directly (the same distribution: variance 1 / HW per channel)."""
    w = layer.weight
    pooled = isinstance(layer, PooledHead) and len(src_shape) == 3
    shape = (src_shape[0],) if pooled else src_shape
    scale = 1.0 / math.sqrt(src_shape[1] * src_shape[2]) if pooled else 1.0
    per_chunk = max(1, CHUNK // math.prod(shape))
    total = torch.zeros_like(w)
    for start in range(0, n, per_chunk):
        x = torch.randn((min(per_chunk, n - start), *shape), generator=gen, dtype=w.dtype)
        x = x.mul_(scale).to(w.device)
        # (pooled features, as the head's own map takes them when handed features, not maps)
        total.add_(layer.weight_grad(x, layer.linear(x, w)))
    if isinstance(layer, Conv):  # a tap that meets only padding correlates nothing: it stays 0
        taps = _taps(layer, src_shape).clamp_min(1.0)
        return total.div_((taps * n).to(w.device, w.dtype))
    return total.div_(n * scale * scale)


def mirrored(blocks: list[Block]) -> list[tuple[str, Layer, tuple[int, ...]]]:
    """(model-wide name, layer, its input's shape) for every layer whose error synapse learns."""
    out = []
    for block in blocks:
        for wire in block.wires:
            layer = block.layer(wire.layer)
            if layer.feedback is not None and layer.feedback.requires_grad:
                src = block.in_shape if wire.src < 0 else block.node_shapes[wire.src]
                out.append((f"{block.name}.{wire.layer}", layer, tuple(src)))
    return out


def _noise(seed: int, step: int, name: str) -> torch.Generator:
    key = (seed * 1_000_003 + step) * 65_537 + zlib.crc32(name.encode())
    return torch.Generator().manual_seed(key % (1 << 63))


@torch.no_grad()
def mirror(
    blocks: list[Block],
    angle: float,
    seed: int,
    step: int,
    rate: float = 1.0,
    only: set[str] | None = None,
) -> None:
    """Move every learning error synapse (of the layers named in `only`, if given) toward a
    fresh mirror estimate of its layer's W (E += rate · (M − E); rate 1 sets E to the
    estimate), drawn for about `angle` degrees."""
    for name, layer, src in mirrored(blocks):
        if only is not None and name not in only:
            continue
        assert layer.feedback is not None
        n = noise_samples(layer, src, angle)
        layer.feedback.lerp_(estimate(layer, src, n, _noise(seed, step, name)), rate)
