"""Backprop: stage-local autograd; the boundary gradient is passed between stages (GPipe)."""

from __future__ import annotations

import torch

from workers.layers import Layer
from workers.rules.base import Rule, register


@register
class Backprop(Rule):
    name = "backprop"
    autograd = True

    def layer_map(self, layer: Layer, z: torch.Tensor) -> torch.Tensor:
        """The map each layer applies in the differentiable forward."""
        return layer(z)
