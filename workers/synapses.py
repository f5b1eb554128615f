"""Skip error synapses: learned maps from the K-class output error to a junction's shape."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SkipSynapse(nn.Module):
    """d = S(e_L): a dense map from K classes to a small C x g x g grid, upsampled to C x H x W.

    With `grid` 0 (or >= H) the map is dense to the full junction shape; on an MLP junction
    (shape (D,)) it is always dense. The factored form keeps ImageNet-sized junctions cheap.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], grid: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        if len(shape) == 3 and 0 < grid < max(shape[1], shape[2]):
            self.inner: tuple[int, ...] = (shape[0], min(grid, shape[1]), min(grid, shape[2]))
        else:
            self.inner = self.shape
        self.weight = nn.Parameter(torch.empty(math.prod(self.inner), num_classes))

    def _apply_with(self, e: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        v = (e @ weight.T).view(e.shape[0], *self.inner)
        if self.inner != self.shape:
            v = F.interpolate(v, size=self.shape[1:], mode="nearest")
        return v

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self._apply_with(e, self.weight)

    def pullback(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """d<S(e), v>/dS, batch-summed: e_L correlated with v pulled back through the upsampling."""
        if self.inner == self.shape:
            pooled = v.flatten(1)
        elif self.shape[1] % self.inner[1] == 0 and self.shape[2] % self.inner[2] == 0:
            cell = (self.shape[1] // self.inner[1], self.shape[2] // self.inner[2])
            pooled = F.avg_pool2d(v, cell, divisor_override=1).flatten(1)  # nearest's adjoint
        else:
            with torch.enable_grad():
                w = self.weight.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self._apply_with(e, w), w, v)
            return g
        return pooled.T @ e
