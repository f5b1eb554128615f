"""Sign symmetry (Liao et al. 2016; Xiao et al. 2018; biotorch's uSF): backprop's chain with each
layer's W^T replaced by sign(W)^T, scaled per layer to W's norm.

Not transport-free: the feedback is read from the current W at each use, a one-bit transport of
W's sign (plus one scalar per layer, its scale). There is nothing to learn and no parameter.

The scale: plain sign(W) (biotorch's uSF by default) has entries of 1 where W's are about
rms(W) ~ sqrt(2 / fan_in), so in a ResNet the error a conv branch carries would outgrow the
identity shortcut's by about 1 / rms(W) in every block (8x for a 16-channel 3x3 conv at Kaiming
scale). biotorch's optional `scaling_factor` multiplies by sqrt(2 / (fan_in + fan_out)), a
constant fixed at initialisation (after Xiao et al. 2018). We scale by the RMS of W instead, so
that the feedback has W's Frobenius norm, ||rms(W) sign(W)|| = ||W||, at every step: it scales
with W as W^T does. Under BatchNorm the forward is invariant to W's scale and BN's backward
divides by it, so backprop's error is invariant to W's scale; with the feedback scaled by rms(W)
the carried error is too, while with a fixed constant it would grow as weight decay shrinks W.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from workers.layers import Layer
from workers.rules.backprop import Backprop
from workers.rules.base import register
from workers.rules.fa import feedback_backward


def sign_feedback(weight: torch.Tensor) -> torch.Tensor:
    """sign(W) times the RMS of W: the sign of W with W's Frobenius norm."""
    rms = torch.linalg.vector_norm(weight) / math.sqrt(weight.numel())
    return torch.sign(weight).mul_(rms)


class _SignMap(torch.autograd.Function):
    """Forward W z; backward sends the error down through sign(W) * rms(W), read from W as it is
    when the error arrives (as backprop reads W^T then)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        ctx.save_for_backward(z, weight)
        ctx.layer = layer
        return layer.linear(z, weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, weight = ctx.saved_tensors
        needs_input = ctx.needs_input_grad[0]
        # with no error to send down, the kernel reads only W's shape
        feedback = sign_feedback(weight) if needs_input else weight
        grad_z, grad_w = feedback_backward(ctx.layer, z, feedback, grad, needs_input)
        return grad_z, grad_w, None


@register
class Sign(Backprop):
    """Sign symmetry: feedback sign(W)^T scaled to ||W||, recomputed from the current W at each
    use (a one-bit transport of W's sign); no error-synapse parameter, nothing learns it."""

    name = "sign"

    def layer_map(self, layer: Layer, z: torch.Tensor) -> torch.Tensor:
        if not z.requires_grad:  # the model's first layer: nothing to send below
            return layer(z)
        return layer.post(_SignMap.apply(z, layer.weight, layer))
