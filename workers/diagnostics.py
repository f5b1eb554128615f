"""Alignment a user can watch: error synapses against the Wᵀ they stand in for, and (opt-in) each
local update against backprop's gradient of the same micro-batch, from a side pass never learned."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from workers.blocks import Block
from workers.layers import Layer


def layer_items(blocks: list[Block]) -> Iterator[tuple[str, Layer]]:
    """(model-wide layer name, layer) for every layer of `blocks`."""
    for block in blocks:
        for lname, layer in block.layer_items():
            yield f"{block.name}.{lname}", layer


def synapse_angles(blocks: list[Block]) -> dict[str, float]:
    """Degrees between each layer's error synapse E and its forward weight W.

    E carries errors where Wᵀ would and is stored in W's shape (a transposed conv shares the
    kernel's layout), so the angle between the two flattened tensors is the angle between E and
    Wᵀ: 0° is exact transport, 90° is no alignment, as at a random start.
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in layer_items(blocks):
            if layer.feedback is None:
                continue
            cos = F.cosine_similarity(layer.feedback.flatten(), layer.weight.flatten(), dim=0)
            out[name] = math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))
    return out


@contextmanager
def frozen_bn_stats(blocks: list[Block]) -> Iterator[None]:
    """Run train-mode forwards (batch statistics) without moving BatchNorm's running stats."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for block in blocks
        for m in block.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
        and m.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        # through .data: graphs of micro-batches still in flight saved these very tensors, and
        # an in-place write they can see would void them (autograd's version check)
        for m, mean, var, count in saved:
            for buf, value in ((m.running_mean, mean), (m.running_var, var)):
                buf.data.copy_(value)  # type: ignore[union-attr]
            m.num_batches_tracked.data.copy_(count)  # type: ignore[union-attr]


class BackpropProbe:
    """Backprop's gradient of a stage's layer weights, summed over the probed micro-batches.

    `run` redoes the stage's forward from the cached stage input with plain autograd (the same
    weights and input noise as the training forward), and returns the gradient at the stage
    input for the stage below. Nothing it computes reaches a parameter's .grad: it is a
    measurement beside the learning, never part of it.
    """

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks
        self.weights: dict[str, torch.Tensor] = {
            name: layer.weight for name, layer in layer_items(blocks)
        }
        self.grads: dict[str, torch.Tensor] = {}

    def run(
        self,
        x: torch.Tensor,
        *,
        labels: torch.Tensor | None,
        grad_out: torch.Tensor | None,
        needs_input_grad: bool,
    ) -> torch.Tensor | None:
        names = [n for n, w in self.weights.items() if w.requires_grad]
        x = x.detach().requires_grad_(needs_input_grad)
        with torch.enable_grad(), frozen_bn_stats(self.blocks):
            out = x
            for block in self.blocks:
                out = block(out)
            if labels is not None:
                root, seed = F.cross_entropy(out, labels, reduction="sum"), None
            elif grad_out is not None:
                root, seed = out, grad_out.to(out.device, out.dtype)
            else:
                raise ValueError("diagnostics: the probe needs labels or the gradient from above")
            inputs = [self.weights[n] for n in names] + ([x] if needs_input_grad else [])
            grads = torch.autograd.grad(root, inputs, grad_outputs=seed, allow_unused=True)
        for name, g in zip(names, grads, strict=False):
            if g is not None:
                self.grads[name] = g if name not in self.grads else self.grads[name] + g
        return grads[-1] if needs_input_grad else None

    def cosines(self) -> dict[str, float]:
        """Cosine between each layer's accumulated local update (its .grad) and backprop's
        gradient of the same micro-batches; then forget them."""
        out: dict[str, float] = {}
        for name, g_bp in self.grads.items():
            local = self.weights[name].grad
            if local is not None:
                cos = F.cosine_similarity(local.flatten(), g_bp.flatten(), dim=0, eps=1e-30)
                out[name] = max(-1.0, min(1.0, float(cos)))
        self.grads.clear()
        return out
