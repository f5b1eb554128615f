"""LRA-E (AAAI 2019): targets along the adjacent path only, error units e = z - y."""

from __future__ import annotations

from workers.blocks import Block, Wire
from workers.rules.base import Rule, register


@register
class LRAE(Rule):
    """The parent algorithm: every node's displacement comes from the layer above through E;
    `rule.topology` and the L1/L2 mix do not apply."""

    name = "lra_e"

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        return None if wire.shortcut else self.cfg.feedback_update
