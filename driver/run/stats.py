"""Aggregate the small stats every stage reports per step (times, bytes, staleness, norms,
alignment)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from workers.spec import StageStats

log = logging.getLogger(__name__)


@dataclass
class StageTotals:
    forward_seconds: float = 0.0
    learn_seconds: float = 0.0
    idle_seconds: float = 0.0
    bytes_received: int = 0
    micro_batches: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    cached: int = 0
    cached_bytes: int = 0  # the most bytes held between forwards and learns, any window
    local_loss: dict[str, float] = field(default_factory=dict)
    update_norm: dict[str, float] = field(default_factory=dict)
    synapse_angle: dict[str, float] = field(default_factory=dict)  # latest, per layer
    backprop_cosine: dict[str, float] = field(default_factory=dict)  # latest probed, per layer
    start_angle: dict[str, float] = field(default_factory=dict)  # E-W as training started
    mirror_seconds: float = 0.0  # weight-mirror time (workers/mirror.py)

    @property
    def staleness_mean(self) -> float:
        return self.staleness_sum / self.micro_batches if self.micro_batches else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "forward_s": self.forward_seconds,
            "learn_s": self.learn_seconds,
            "idle_s": self.idle_seconds,
            "bytes_received": self.bytes_received,
            "micro_batches": self.micro_batches,
            "staleness_mean": self.staleness_mean,
            "staleness_max": self.staleness_max,
            "cached": self.cached,
            "cached_bytes": self.cached_bytes,
            "mirror_s": self.mirror_seconds,
        }


class StatsBook:
    """Running totals per stage; `add` takes what runners' drain_stats() return."""

    def __init__(self) -> None:
        self.stages: dict[int, StageTotals] = {}

    def add(self, reports: list[tuple[int, StageStats]]) -> None:
        for stage, st in reports:
            t = self.stages.setdefault(stage, StageTotals())
            t.forward_seconds += st.forward_seconds
            t.learn_seconds += st.learn_seconds
            t.idle_seconds += st.idle_seconds
            t.bytes_received += st.bytes_received
            t.micro_batches += st.micro_batches
            t.staleness_sum += sum(st.staleness)
            t.staleness_max = max([t.staleness_max, *st.staleness])
            t.cached = st.cached
            t.cached_bytes = max(t.cached_bytes, st.cached_bytes)
            if st.started_fresh:
                log.warning(
                    "stage %d: the checkpoint was cut elsewhere, so %s start(s) fresh, from "
                    "initialisation and a weight mirror (auxiliary heads, error synapses); the "
                    "blocks keep their weights",
                    stage,
                    ", ".join(st.started_fresh),
                )
            t.local_loss.update(st.local_loss)
            t.update_norm.update(st.update_norm)
            t.synapse_angle.update(st.synapse_angle)
            t.backprop_cosine.update(st.backprop_cosine)  # {} between probes: keeps the last
            t.start_angle.update(st.start_angle)  # sent once, by a fresh stage's first stats
            t.mirror_seconds += st.mirror_seconds

    def summary(self) -> dict[str, dict[str, float]]:
        return {str(s): t.summary() for s, t in sorted(self.stages.items())}

    def start_angles(self) -> dict[str, float]:
        """Degrees between each layer's E and W as training started (after any weight-mirror
        phase), over every stage."""
        out: dict[str, float] = {}
        for _, t in sorted(self.stages.items()):
            out.update(t.start_angle)
        return out

    @property
    def mirror_seconds(self) -> float:
        """Weight-mirror time, the sum over stages (stages mirror at once, each on its own)."""
        return sum(t.mirror_seconds for t in self.stages.values())

    def alignment(self) -> tuple[dict[str, float], dict[str, float]]:
        """(synapse angle in degrees, backprop cosine) per layer over every stage: the latest of
        each (layer names are model-wide, so stages never collide)."""
        angles: dict[str, float] = {}
        cosines: dict[str, float] = {}
        for _, t in sorted(self.stages.items()):
            angles.update(t.synapse_angle)
            cosines.update(t.backprop_cosine)
        return angles, cosines
