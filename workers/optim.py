"""Optimizers fed with local updates as if they were gradients, and the update re-projection."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    schedule: str = "cosine"  # learning rate over the run: constant, or cosine decay to 0
    total_steps: int = 0  # steps the schedule spans; 0: filled in by the driver from the run

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {list(SCHEDULES)}")
        if self.total_steps < 0:
            raise ValueError(f"optim.total_steps: must be >= 0, got {self.total_steps}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name: {self.name!r} is not one of {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}: must lie in [0, 1), got {getattr(self, key)}")


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True
        )
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=True,
    )


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based)."""
    if cfg.schedule == "constant" or cfg.total_steps <= 0:
        return 1.0
    progress = min(step, cfg.total_steps) / cfg.total_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, step)


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
