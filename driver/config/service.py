"""The [service] section: where `reclra serve` listens and how clients authenticate."""

from __future__ import annotations

import os
from dataclasses import dataclass


class TokenMissing(ValueError):
    """No bearer token is configured for the service."""


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    addr: str = "127.0.0.1"
    """Where the gRPC API listens."""
    port: int = 50051
    """gRPC port (0 picks a free one)."""
    token: str = ""
    """The bearer token clients must send; "" reads it from service.token_env."""
    token_env: str = "RECLRA_TOKEN"
    """The environment variable holding the token when service.token is empty."""
    max_workers: int = 256
    """gRPC threads: every WatchRun holds one while it streams."""
    runs_dir: str = "runs/service"
    """Where served runs write: runs_dir/<run_id> (a path or a storage URI)."""
    watch_interval_s: float = 0.25
    """WatchRun sends at most one progress event per interval."""
    max_active_runs: int = 1
    """Runs training at once; later ones wait as pending (FIFO)."""
    max_queued: int = 16
    """Pending runs; StartRun beyond it is RESOURCE_EXHAUSTED."""
    keep_finished: int = 100
    """Finished runs held in memory (their files always stay)."""
    max_request_bytes: int = 4 * 1024 * 1024
    """Larger requests are RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"service.port: {self.port} is not a TCP port (0-65535)")
        if self.watch_interval_s < 0:
            raise ValueError(f"service.watch_interval_s: must be >= 0, got {self.watch_interval_s}")
        if self.max_workers < 2:
            raise ValueError(f"service.max_workers: must be >= 2, got {self.max_workers}")
        for key, low in (("max_active_runs", 1), ("max_queued", 0), ("keep_finished", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"service.{key}: must be >= {low}, got {getattr(self, key)}")
        if not 1024 <= self.max_request_bytes < 2**31:
            got = self.max_request_bytes
            raise ValueError(f"service.max_request_bytes: must be 1024 to 2**31 - 1, got {got}")
        if not self.runs_dir:
            raise ValueError("service.runs_dir: must name a folder (or a storage URI), got ''")

    def resolved_token(self) -> str:
        token = self.token or os.environ.get(self.token_env, "")
        if not token:
            raise TokenMissing(
                f"service: no bearer token; set service.token or the "
                f"{self.token_env} environment variable"
            )
        return token
