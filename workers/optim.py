"""Optimizers fed with local updates as if they were gradients, and the update re-projection."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from workers.bounds import Limits, check_bounds

OPTIMIZERS = ("adamw", "sgd")  # the Literal choices of OptimConfig.name and .schedule
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """The optimizer the local updates are fed to, as if they were gradients."""
    lr: float = 3e-3
    """The learning rate (error synapses: times rule.gamma)."""
    weight_decay: float = 1.0
    """Decoupled weight decay of kernels and matrices (not biases or BatchNorm); the error
    synapses' decay is matched so that E and W shrink alike (Kolen-Pollack)."""
    momentum: float = 0.9
    """SGD's momentum."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """The learning rate over the run: constant, or cosine decay to 0."""
    total_steps: int = 0
    """Steps the schedule spans; 0: the run's own (filled in by the driver)."""

    # each numeric key's closed range (workers/bounds.py); lr > 0 and the decays < 1 are
    # checked below. Steps: 10**12 (train.epochs times a step per sample of a big set).
    LIMITS: ClassVar[Limits] = {
        "lr": (0.0, 100.0),
        "weight_decay": (0.0, 100.0),
        "momentum": (0.0, 1.0),
        "beta1": (0.0, 1.0),
        "beta2": (0.0, 1.0),
        "total_steps": (0, 10**12),
    }

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
        check_bounds("optim", self, self.LIMITS)


def build_optimizer(
    cfg: OptimConfig,
    params: Iterable[torch.nn.Parameter],
    feedback: Iterable[torch.nn.Parameter] = (),
    *,
    feedback_rate: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer over a stage's parameters, in three groups.

    Forward weights (matrices and kernels) decay by `weight_decay`; 1-d parameters (biases,
    BatchNorm's affine) never decay. Error synapses (`feedback`) get their own group whose
    learning rate is `feedback_rate` times the forward one (rule.gamma), so the rate acts under
    every optimizer, also under Adam's per-tensor normalisation; their weight decay is scaled so
    that they shrink by the same fraction per step as the forward weights (Kolen-Pollack: E and
    gamma*W then converge).
    """
    params, feedback = list(params), list(feedback)
    decay = [p for p in params if p.dim() > 1]
    flat = [p for p in params if p.dim() <= 1]
    wd_feedback = cfg.weight_decay / feedback_rate if feedback_rate > 0 else 0.0
    groups: list[dict[str, Any]] = [
        {"params": ps, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd}
        for ps, scale, wd in (
            (decay, 1.0, cfg.weight_decay),
            (flat, 1.0, 0.0),
            (feedback, feedback_rate, wd_feedback),
        )
        if ps
    ]
    if not groups:  # a stage with nothing to learn still steps its (empty) optimizer
        groups = [{"params": [], "lr": cfg.lr, "lr_scale": 1.0, "weight_decay": 0.0}]
    # fused kernels: one call for all tensors, and (unlike foreach) they do not bump autograd's
    # version counters, so the cached graphs of micro-batches still in flight stay valid when
    # an async stage steps in between (those graphs only ever read their saved activations)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_factor(cfg: OptimConfig, step: float) -> float:
    """The learning-rate multiplier at training step `step` (0-based; fractional when an
    optimizer step covers part of a training step)."""
    if cfg.schedule == "constant" or cfg.total_steps <= 0:
        return 1.0
    progress = min(step, cfg.total_steps) / cfg.total_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: float) -> None:
    factor = cfg.lr * lr_factor(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = factor * group.get("lr_scale", 1.0)


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
