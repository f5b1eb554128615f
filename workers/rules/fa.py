"""Feedback alignment: backprop's chain, with each layer's W^T replaced by a fixed random E."""

from __future__ import annotations

from typing import Any

import torch

from workers.blocks import Block, Wire
from workers.layers import Layer
from workers.rules.backprop import Backprop
from workers.rules.base import register


class _FeedbackMap(torch.autograd.Function):
    """Forward W z; backward sends the error down through E instead of W."""

    @staticmethod
    def forward(
        ctx: Any, z: torch.Tensor, weight: torch.Tensor, feedback: torch.Tensor, layer: Layer
    ) -> torch.Tensor:
        ctx.save_for_backward(z, feedback)
        ctx.layer = layer
        return layer.linear(z, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, feedback = ctx.saved_tensors
        layer: Layer = ctx.layer
        grad_z = layer.transpose(grad, feedback, z) if ctx.needs_input_grad[0] else None
        return grad_z, layer.weight_grad(z, grad), None, None


@register
class FA(Backprop):
    name = "fa"

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        return "fixed"

    def layer_map(self, layer: Layer, z: torch.Tensor) -> torch.Tensor:
        if layer.feedback is None:  # the model's first layer: nothing to send below
            return layer(z)
        return layer.post(_FeedbackMap.apply(z, layer.weight, layer.feedback, layer))
