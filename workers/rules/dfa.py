"""DFA: the output error broadcast to every node through fixed random maps, times act'(h)."""

from __future__ import annotations

import torch

from workers.blocks import Block
from workers.rules.base import Rule, RuleConfig, register


@register
class DFA(Rule):
    name = "dfa"

    @classmethod
    def is_chained(cls, cfg: RuleConfig) -> bool:
        return False  # the output error reaches every node directly

    def skip_mode(self, block: Block, node: int) -> str | None:
        return None if block.head else "fixed"

    def node_error(
        self, h: torch.Tensor, z: torch.Tensor, d: torch.Tensor, act: str, mix: float
    ) -> torch.Tensor:
        if act == "relu":
            return d * (h > 0).to(d.dtype)
        if act == "tanh":
            return d * (1 - z * z)
        return d
