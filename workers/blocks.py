"""Blocks: small graphs of layers between two cut points (stem, residual, dense, head)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers import BatchNormSaved, Layer
from workers.synapses import SkipSynapse

ACTS = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda h: h}


def activate(act: str, h: torch.Tensor) -> torch.Tensor:
    return ACTS[act](h)


@dataclass
class Wire:
    layer: str  # name in Block.layers
    src: int  # node index, -1 for the block input
    tgt: int
    shortcut: bool = False  # a projection shortcut: a forward skip, off the adjacent error path


@dataclass
class BlockCache:
    """What a target rule keeps of one micro-batch's forward through one block."""

    input: torch.Tensor
    h: list[torch.Tensor] = field(default_factory=list)
    z: list[torch.Tensor] = field(default_factory=list)
    # BatchNorm layers only: what each one's own backward needs (W z and its batch statistics)
    bn_saved: dict[str, BatchNormSaved] = field(default_factory=dict)
    pool_index: torch.Tensor | None = None


class Block(nn.Module):
    """Nodes (post-activations) joined by layers and identity shortcuts; the last is the output.

    h_n = sum of the layers into n (+ identity shortcuts into n); z_n = act_n(h_n). The ImageNet
    stem max-pools its output node. A `head` block's single node is the logits.
    """

    def __init__(
        self,
        name: str,
        layers: dict[str, Layer],
        wires: list[Wire],
        acts: list[str],
        *,
        identity: list[tuple[int, int]] | None = None,
        out_pool: bool = False,
        head: bool = False,
        in_shape: tuple[int, ...] = (),
        node_shapes: list[tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = nn.ModuleDict(layers)
        self.wires = wires
        self.acts = acts
        self.identity = identity or []
        self.out_pool = out_pool
        self.head = head
        self.in_shape = in_shape
        self.node_shapes = node_shapes or []
        self.skips = nn.ModuleDict()  # node index (as str) -> SkipSynapse, added by the rule
        self.wires_into = [[w for w in wires if w.tgt == n] for n in range(len(acts))]
        self.identity_into = [[s for s, t in self.identity if t == n] for n in range(len(acts))]

    def layer(self, name: str) -> Layer:
        return self.layers[name]  # type: ignore[return-value]

    def layer_items(self) -> list[tuple[str, Layer]]:
        return list(self.layers.items())  # type: ignore[arg-type]

    def skip(self, node: int) -> SkipSynapse:
        return self.skips[str(node)]  # type: ignore[return-value]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The shape of one sample of the block's output (after the ImageNet stem's pool)."""
        c, *hw = self.node_shapes[self.out_node]
        if self.out_pool:
            hw = [(n + 2 - 3) // 2 + 1 for n in hw]
        return (c, *hw)

    @property
    def narrowest(self) -> int:
        """Channels (features) of the block's narrowest node: a basic block's or a dense
        block's width, a bottleneck's inner width (a quarter of its output's)."""
        return min(shape[0] for shape in self.node_shapes)

    @property
    def out_node(self) -> int:
        return len(self.acts) - 1

    def layer_names(self) -> list[str]:
        return [f"{self.name}.{n}" for n in self.layers]

    def _pool(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.out_pool:
            return z, None
        return F.max_pool2d(z, 3, stride=2, padding=1, return_indices=True)

    def unpool(self, d: torch.Tensor, cache: BlockCache) -> torch.Tensor:
        """The adjoint of the output max-pool: each pooled displacement goes back to its argmax,
        summed where overlapping windows share one."""
        if not self.out_pool:
            return d
        return torch.ops.aten.max_pool2d_with_indices_backward(
            d, cache.z[self.out_node], [3, 3], [2, 2], [1, 1], [1, 1], False, cache.pool_index
        )

    def forward(self, x: torch.Tensor, layer_map=None) -> torch.Tensor:  # noqa: ANN001
        """Plain differentiable forward (autograd rules, evaluation). `layer_map(layer, z)` may
        replace each layer's map (FA swaps its backward)."""
        zs: list[torch.Tensor] = []
        for n, act in enumerate(self.acts):
            h: torch.Tensor | None = None
            for w in self.wires_into[n]:
                z = x if w.src < 0 else zs[w.src]
                layer = self.layer(w.layer)
                out = layer_map(layer, z) if layer_map else layer(z)
                h = out if h is None else h + out
            zs.append(activate(act, self._add_identity(n, h, x, zs)))
        return self._pool(zs[-1])[0]

    @torch.no_grad()
    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, BlockCache]:
        """Forward keeping what the local rules need. No autograd graph is built at all: a
        layer's update is computed later from its own cached input and error, and a BatchNorm
        layer keeps its own W z and batch statistics for its own backward (`bn_saved`)."""
        x = x.detach()
        cache = BlockCache(input=x)
        zs = cache.z
        for n, act in enumerate(self.acts):
            h: torch.Tensor | None = None
            for w in self.wires_into[n]:
                layer = self.layer(w.layer)
                lin = layer.linear(x if w.src < 0 else zs[w.src], layer.weight)
                out, saved = layer.post_local(lin)
                if saved is not None:
                    cache.bn_saved[w.layer] = saved
                h = out if h is None else h + out
            h = self._add_identity(n, h, x, zs)
            cache.h.append(h)
            zs.append(activate(act, h))
        out, cache.pool_index = self._pool(zs[-1])
        return out, cache

    def _add_identity(
        self, n: int, h: torch.Tensor | None, x: torch.Tensor, zs: list[torch.Tensor]
    ) -> torch.Tensor:
        for s in self.identity_into[n]:
            h = h + (x if s < 0 else zs[s])  # type: ignore[operator]
        assert h is not None, f"node {n} of {self.name} has no input"
        return h
