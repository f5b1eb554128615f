"""Feedback alignment: backprop's chain, with each layer's W^T replaced by a fixed random E."""

from __future__ import annotations

from typing import Any

import torch

from workers.blocks import Block, Wire
from workers.layers import Layer
from workers.rules.backprop import Backprop
from workers.rules.base import register


def feedback_backward(
    layer: Layer, z: torch.Tensor, feedback: torch.Tensor, grad: torch.Tensor, needs_input: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the error at the layer's input, sent down through `feedback` in place of W, or None
    unless `needs_input`; the weight gradient, the correlation of the input z with the error
    `grad` at the output): Layer.update_and_carry, one kernel call for both on a conv."""
    grad_w, grad_z = layer.update_and_carry(z, grad, feedback if needs_input else None)
    return grad_z, grad_w


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
        grad_z, grad_w = feedback_backward(ctx.layer, z, feedback, grad, ctx.needs_input_grad[0])
        return grad_z, grad_w, None, None


@register
class FA(Backprop):
    name = "fa"

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        return "fixed"

    def layer_map(self, layer: Layer, z: torch.Tensor) -> torch.Tensor:
        if layer.feedback is None:  # the model's first layer: nothing to send below
            return layer(z)
        # E enters detached: the error it carries never gives it a gradient (under `kp` its
        # update is its layer's, set by the Stage at apply)
        return layer.post(_FeedbackMap.apply(z, layer.weight, layer.feedback.detach(), layer))
