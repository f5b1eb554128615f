"""rec-LRA: local targets from error synapses; junctions fed from e_L by skip synapses (`skip`)."""

from __future__ import annotations

from workers.blocks import Block, Wire
from workers.rules.base import Rule, RuleConfig, register


@register
class RecLRA(Rule):
    """Topologies: `skip` (junctions from e_L, interiors from the layer above: stages learn in
    parallel), `mirror` (errors follow the forward skips too), `adjacent` (plain LRA-E path),
    `stage` (`mirror` inside each pipeline stage, whose top alone is fed from e_L: stages learn
    in parallel, and with one stage it is `mirror`), `decoupled` (`mirror` inside each stage,
    whose top learns from an auxiliary head of its own on the labels: nothing goes down a
    stage boundary, and with one stage it is `mirror`)."""

    name = "rec_lra"

    @classmethod
    def is_chained(cls, cfg: RuleConfig) -> bool:
        # skip and stage feed each stage's top from e_L; decoupled from its own head
        return cfg.topology not in ("skip", "stage", "decoupled")

    @classmethod
    def is_decoupled(cls, cfg: RuleConfig) -> bool:
        return cfg.topology == "decoupled"

    def _skip_fed(self, block: Block, node: int) -> bool:
        if block.head or node != block.out_node:
            return False
        topology = self.cfg.topology
        return topology == "skip" or (topology == "stage" and block.name == self.stage_top)

    def feedback_mode(self, block: Block, wire: Wire) -> str | None:
        topology = self.cfg.topology
        if topology == "skip" and (wire.src < 0 or block.head):
            return None  # its source is a junction, fed by a skip synapse instead
        if topology == "adjacent" and wire.shortcut:
            return None
        return self.cfg.feedback_update

    def skip_mode(self, block: Block, node: int) -> str | None:
        return self.cfg.skip_update if self._skip_fed(block, node) else None

    def uses_identity(self) -> bool:
        return self.cfg.topology in ("mirror", "stage", "decoupled")

    def mix(self, block: Block, node: int) -> float:
        return self.cfg.mix_skip if self._skip_fed(block, node) else self.cfg.mix_adjacent
