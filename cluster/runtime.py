"""Connect to a Ray cluster by address (or RAY_ADDRESS), or start a local one; token auth."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ray

from cluster.errors import ClusterError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    address: str = ""
    """The Ray cluster to join; "": RAY_ADDRESS if set, else a local Ray on this machine."""
    num_cpus: int = 0
    """A local Ray's CPUs; 0 lets Ray count the cores."""
    num_gpus: int = -1
    """A local Ray's GPUs; -1 lets Ray detect them."""
    namespace: str = "reclra"
    """The Ray namespace of the run's actors."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray's runtime_env for the workers (e.g. env_vars)."""

    # each numeric key's closed range, as workers/bounds.py reads LIMITS (cluster/ may not import
    # workers/, so the check is spelled out below): logical resources, so more than the machine
    # has is allowed, within reason
    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {"num_cpus": (0, 65_536), "num_gpus": (-1, 1024)}

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ValueError(f"cluster.num_cpus: must be >= 0, got {self.num_cpus}")
        if self.num_gpus < -1:
            raise ValueError(f"cluster.num_gpus: must be >= -1, got {self.num_gpus}")
        for key, (low, high) in self.LIMITS.items():
            value = getattr(self, key)
            if value > high:
                raise ValueError(
                    f"cluster.{key}: {value} is above the bound {high}; use at most {high}"
                )
            if value < low:
                raise ValueError(
                    f"cluster.{key}: {value} is below the bound {low}; use at least {low}"
                )


def auth_token_available() -> bool:
    """Whether Ray's token auth would find a token (RAY_AUTH_TOKEN, _PATH, or the default file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).is_file() and Path(path).stat().st_size > 0
    return (Path.home() / ".ray" / "auth_token").is_file()


def connect(cfg: ClusterConfig) -> bool:
    """Join the configured cluster, or start a local one. Returns True when this call started
    Ray (so the caller should shut it down). An already-initialised Ray is reused."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    remote = bool(address) and address != "local"
    if remote and os.environ.get("RAY_AUTH_MODE") == "token" and not auth_token_available():
        raise ClusterError(
            "cluster: RAY_AUTH_MODE=token but no token found; set RAY_AUTH_TOKEN (the value of "
            "`ray get-auth-token` on the head node) or RAY_AUTH_TOKEN_PATH"
        )
    kwargs: dict[str, Any] = {"namespace": cfg.namespace, "log_to_driver": True}
    if cfg.runtime_env:
        kwargs["runtime_env"] = cfg.runtime_env
    try:
        if remote:
            ray.init(address=address, **kwargs)
        else:
            # address "local": always a new Ray of this run's own, never a `ray start` cluster
            # that happens to run on this machine (it would refuse num_cpus, or share it)
            local: dict[str, Any] = {
                "address": "local",
                "num_cpus": cfg.num_cpus or None,
                "include_dashboard": False,
            }
            if cfg.num_gpus >= 0:
                local["num_gpus"] = cfg.num_gpus
            ray.init(**local, **kwargs)
    except ConnectionError as exc:
        raise ClusterError(
            f"cluster: cannot reach Ray at {address!r} ({exc}); check cluster.address or "
            "RAY_ADDRESS, and that the head node is up"
        ) from None
    log.info(
        "ray: %s cluster with %s",
        "joined" if remote else "started a local",
        ray.cluster_resources(),
    )
    return not remote


class RaySession:
    """The Ray a runner uses: joined (or started) on construction; close() shuts down only a
    local Ray this session started, never a cluster it joined or a Ray someone else began."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.started = connect(cfg)

    @property
    def can_grow(self) -> bool | None:
        """False for a local Ray this session started (a placement that cannot fit never
        will); None: ask the cluster (an autoscaler may add nodes)."""
        return False if self.started else None

    def close(self) -> None:
        if self.started and ray.is_initialized():
            ray.shutdown()
        self.started = False
