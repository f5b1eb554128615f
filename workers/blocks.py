"""Blocks: small graphs of layers between two cut points (stem, residual block, dense block, head)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.layers import Layer

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
    layer_out: dict[str, torch.Tensor] = field(default_factory=dict)
    pool_index: torch.Tensor | None = None


class Block(nn.Module):
    """Nodes (post-activations) joined by layers and identity shortcuts; the last node is the output.

    h_n = sum of the layers into n (+ identity shortcuts into n); z_n = act_n(h_n). The ImageNet
    stem max-pools its output node. A `head` block's single node is the logits.
    """

    def __init__(
        self, name: str, layers: dict[str, Layer], wires: list[Wire], acts: list[str], *,
        identity: list[tuple[int, int]] | None = None, out_pool: bool = False, head: bool = False,
        in_shape: tuple[int, ...] = (), node_shapes: list[tuple[int, ...]] | None = None,
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
        """Route a displacement at the pooled output back to the pooled positions."""
        if not self.out_pool:
            return d
        out = cache.z[self.out_node]
        return F.max_unpool2d(d, cache.pool_index, 3, stride=2, padding=1, output_size=out.shape[-2:])

    def forward(self, x: torch.Tensor, layer_map=None) -> torch.Tensor:  # noqa: ANN001
        """Plain differentiable forward (autograd rules, evaluation). `layer_map(layer, z)` may
        replace each layer's map (FA swaps its backward)."""
        zs: list[torch.Tensor] = []
        for n, act in enumerate(self.acts):
            h = self._node_input(n, x, zs, lambda lname, z: (
                layer_map(self.layers[lname], z) if layer_map else self.layers[lname](z)))
            zs.append(activate(act, h))
        return self._pool(zs[-1])[0]

    def forward_local(self, x: torch.Tensor) -> tuple[torch.Tensor, BlockCache]:
        """Forward where every layer sees a detached input: no gradient can cross a layer."""
        x = x.detach()
        cache = BlockCache(input=x)

        def run(lname: str, z: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                out = self.layers[lname](z.detach())
            cache.layer_out[lname] = out
            return out.detach()

        for n, act in enumerate(self.acts):
            h = self._node_input(n, x, cache.z, run)
            cache.h.append(h)
            cache.z.append(activate(act, h))
        out, cache.pool_index = self._pool(cache.z[-1])
        return out, cache

    def _node_input(self, n: int, x: torch.Tensor, zs: list[torch.Tensor], run) -> torch.Tensor:  # noqa: ANN001
        def src(i: int) -> torch.Tensor:
            return x if i < 0 else zs[i]

        h: torch.Tensor | None = None
        for w in self.wires:
            if w.tgt == n:
                out = run(w.layer, src(w.src))
                h = out if h is None else h + out
        for s, t in self.identity:
            if t == n:
                assert h is not None
                h = h + src(s)
        assert h is not None, f"node {n} of {self.name} has no input"
        return h
