"""The [service] section: where `reclra serve` listens and how clients authenticate."""

from __future__ import annotations

import os
from dataclasses import dataclass


class TokenMissing(ValueError):
    """No bearer token is configured for the service."""


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    addr: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    token: str = ""  # bearer token clients must send; "" reads it from token_env
    token_env: str = "RECLRA_TOKEN"
    max_workers: int = 256  # gRPC threads: every WatchRun holds one while it streams
    runs_dir: str = "runs/service"
    watch_interval_s: float = 0.25  # WatchRun sends at most one progress event per interval

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"service.port: {self.port} is not a TCP port (0-65535)")
        if self.watch_interval_s < 0:
            raise ValueError(f"service.watch_interval_s: must be >= 0, got {self.watch_interval_s}")
        if self.max_workers < 2:
            raise ValueError(f"service.max_workers: must be >= 2, got {self.max_workers}")

    def resolved_token(self) -> str:
        token = self.token or os.environ.get(self.token_env, "")
        if not token:
            raise TokenMissing(
                f"service: no bearer token; set service.token or the "
                f"{self.token_env} environment variable"
            )
        return token
