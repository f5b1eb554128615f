"""The [service] section: where `reclra serve` listens, how it speaks (TLS, mutual TLS) and how
clients authenticate (the bearer token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workers.bounds import Limits, check_bounds


class TokenMissing(ValueError):
    """No bearer token is configured for the service, or its token_file holds none."""


@dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    addr: str = "127.0.0.1"
    """Where the gRPC API listens. Off loopback it needs TLS (or service.allow_insecure)."""
    port: int = 50051
    """gRPC port (0 picks a free one)."""
    token: str = ""
    """The bearer token clients must send; "" reads service.token_file, else service.token_env."""
    token_file: str = ""
    """A file holding the bearer token (a mounted Kubernetes Secret), used when service.token
    is empty; read again when it changes, so a rotated token needs no restart."""
    token_env: str = "RECLRA_TOKEN"
    """The environment variable holding the token when service.token and token_file are empty."""
    tls_cert: str = ""
    """PEM certificate (chain) the server presents; with service.tls_key the API speaks TLS."""
    tls_key: str = ""
    """PEM private key of service.tls_cert (both or neither)."""
    client_ca: str = ""
    """PEM CA certificate(s): clients must present a certificate it signed (mutual TLS); needs
    service.tls_cert and service.tls_key."""
    allow_insecure: bool = False
    """Serve plain text on an address other than loopback (the token then travels in clear)."""
    max_workers: int = 256
    """gRPC threads: every WatchRun holds one while it streams."""
    runs_dir: str = "runs/service"
    """Where served runs write: runs_dir/<run_id> (a path or a storage URI)."""
    data_roots: tuple[str, ...] = ()
    """Folders a request's data.root must lie under; () allows only the data root the service
    was started with."""
    max_run_memory_gib: float = 0.0
    """A run whose memory estimate exceeds this is refused (RESOURCE_EXHAUSTED); 0: half of the
    machine's memory."""
    watch_interval_s: float = 0.25
    """WatchRun sends at most one progress event per interval."""
    max_active_runs: int = 1
    """Runs training at once; later ones wait as pending (FIFO)."""
    max_queued: int = 16
    """Pending runs; StartRun beyond it is RESOURCE_EXHAUSTED."""
    keep_finished: int = 100
    """Finished runs held in memory and exported in /metrics, newest first; an older one's
    series are removed from /metrics when it leaves (its files always stay)."""
    max_request_bytes: int = 4 * 1024 * 1024
    """Larger requests are RESOURCE_EXHAUSTED."""
    stop_timeout_s: float = 120.0
    """StopRun (and the service's own stop) waits this long for a run to checkpoint and end;
    past it, the run's process is killed."""

    # each numeric key's closed range (workers/bounds.py)
    LIMITS: ClassVar[Limits] = {
        "port": (0, 65535),
        "max_workers": (2, 10_000),
        "watch_interval_s": (0.0, 3600.0),
        "max_active_runs": (1, 1024),
        "max_queued": (0, 100_000),
        "keep_finished": (0, 1_000_000),
        "max_request_bytes": (1024, 2**31 - 1),
        "max_run_memory_gib": (0.0, 1_048_576.0),  # 1 PiB
        "stop_timeout_s": (0.1, 86_400.0),
    }

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
        if any(not root for root in self.data_roots):
            raise ValueError(
                f"service.data_roots: every entry must name a folder, got {list(self.data_roots)}"
            )
        self._check_tls()
        check_bounds("service", self, self.LIMITS)

    def _check_tls(self) -> None:
        for have, need in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
            if getattr(self, have) and not getattr(self, need):
                raise ValueError(
                    f"service.{have} is set but service.{need} is not; set both (PEM paths) "
                    "for TLS, or neither"
                )
        if self.client_ca and not self.tls_cert:
            raise ValueError(
                "service.client_ca (mutual TLS) needs TLS; set service.tls_cert and "
                "service.tls_key too, or drop service.client_ca"
            )

    @property
    def tls(self) -> bool:
        """Whether the API speaks TLS."""
        return bool(self.tls_cert)
