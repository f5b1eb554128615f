"""Skip error synapses: learned maps from the K-class output error to a junction's shape."""

from __future__ import annotations

import math

import torch
from torch import nn


def _nearest(n_in: int, n_out: int) -> torch.Tensor:
    """The source cell of each output position under nearest-neighbour upsampling."""
    return (torch.arange(n_out) * n_in) // n_out


class SkipSynapse(nn.Module):
    """d = S(e_L): a dense map from K classes to a small C x g x g grid, upsampled to C x H x W.

    With `grid` 0 (or >= H) the map is dense to the full junction shape; on an MLP junction
    (shape (D,)) it is always dense. The factored form keeps ImageNet-sized junctions cheap.
    Upsampling is a fixed 0/1 matrix U (g*g x H*W), so S and its adjoint are two matmuls.
    """

    def __init__(self, num_classes: int, shape: tuple[int, ...], grid: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        if len(shape) == 3 and 0 < grid < max(shape[1], shape[2]):
            self.inner: tuple[int, ...] = (shape[0], min(grid, shape[1]), min(grid, shape[2]))
            _, h, w = shape
            _, gh, gw = self.inner
            cell = _nearest(gh, h)[:, None] * gw + _nearest(gw, w)[None, :]
            up = torch.zeros(gh * gw, h * w)
            up[cell.flatten(), torch.arange(h * w)] = 1.0
            self.register_buffer("up", up, persistent=False)
        else:
            self.inner = self.shape
            self.up = None
        self.weight = nn.Parameter(torch.empty(math.prod(self.inner), num_classes))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        v = e @ self.weight.T
        if self.up is not None:
            v = v.view(e.shape[0], self.inner[0], -1) @ self.up
        return v.view(e.shape[0], *self.shape)

    def pullback(self, e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """d<S(e), v>/dS, batch-summed: e_L correlated with v pulled back through the upsampling."""
        if self.up is not None:
            v = v.reshape(v.shape[0], self.inner[0], -1) @ self.up.T
        return v.reshape(v.shape[0], -1).T @ e
