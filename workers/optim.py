"""Optimizers fed with local updates as if they were gradients, and the update re-projection."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: {self.name!r} is not one of {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}: must lie in [0, 1), got {getattr(self, key)}")


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        foreach=True,
    )


def reproject_(grads: list[torch.Tensor], radius: float) -> torch.Tensor:
    """Rescale each update in place to Frobenius norm `radius` when it is longer ("Gaussian
    ball"); return the norms after re-projection. A radius of 0 turns re-projection off."""
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    if not torch.isfinite(norms).all():
        return norms  # the caller refuses the step and names the culprit
    if radius > 0:
        factors = torch.clamp(radius / (norms + 1e-30), max=1.0)
        torch._foreach_mul_(grads, list(factors.unbind()))
        norms = norms * factors
    return norms
