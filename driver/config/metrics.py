"""The [metrics] section: whether `reclra train` serves /metrics, and where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workers.bounds import Limits, check_bounds


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = False
    """Serve /metrics while `reclra train` runs (`reclra serve` always does)."""
    addr: str = "127.0.0.1"
    """Bind address; 0.0.0.0 lets a Prometheus on the network scrape."""
    port: int = 9464
    """TCP port (0 picks a free one)."""

    LIMITS: ClassVar[Limits] = {"port": (0, 65535)}  # workers/bounds.py

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics.port: {self.port} is not a TCP port (0-65535)")
        check_bounds("metrics", self, self.LIMITS)
