"""What a request must pass before the service admits it: it writes only in its own folder,
reads data only under service.data_roots (and the data is there), asks for a model its stages
can cut, and fits the service's memory budget. Everything a run would fail on before its first
step is refused here, so the client hears it now rather than from a failed run.

No grpc here: refusals are plain exceptions that driver/api/service.py maps to status codes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from driver.config import SECTIONS, Config
from driver.config.data import DataConfig
from driver.config.service import ServiceConfig
from driver.data.common import DataError
from driver.data.load import check_present
from driver.run.memory import MemoryEstimate, estimate_memory, model_blocks
from driver.run.trackers import check_packages

# keys that name where a run writes: a request leaves them at their defaults
WRITE_SUFFIXES = ("_dir", "_path", "_uri", "_url", "_file")
GIB = 1024**3


class RunRefused(ValueError):
    """A request the service will not run as asked (INVALID_ARGUMENT)."""


class OverBudget(RuntimeError):
    """A run whose memory estimate exceeds service.max_run_memory_gib (RESOURCE_EXHAUSTED)."""


def check_request(cfg: Config) -> None:
    """Refuse what would let a request write outside its run's folder (or change the service)."""
    for section in SECTIONS:
        ours = getattr(cfg, section)
        base = type(ours)()
        for f in dataclasses.fields(ours):
            key, value = f"{section}.{f.name}", getattr(ours, f.name)
            if value == getattr(base, f.name):
                continue
            if section == "service":
                why = "a request cannot change the service's own settings (reclra serve sets them)"
            elif section != "data" and f.name.endswith(WRITE_SUFFIXES):
                why = "the service writes every run to service.runs_dir/<run_id>"
            elif key == "data.download":
                why = "the service only reads data.root; fetch the data beforehand"
            elif key == "cluster.runtime_env":
                why = "a request cannot install packages or set the environment of the workers"
            else:
                continue
            raise RunRefused(f"{key}: {why}; drop the key from the request")


def data_roots(cfg: ServiceConfig) -> list[Path]:
    """The folders requests may read, resolved (links followed) once, as the service starts:
    service.data_roots, or the default data.root when none are listed."""
    return [Path(root).resolve() for root in (cfg.data_roots or (DataConfig().root,))]


def check_data(cfg: DataConfig, roots: list[Path]) -> None:
    """data.root must lie under an allowed root (after following links), and hold the data."""
    if cfg.name in ("digits", "synthetic"):
        return  # bundled or generated: data.root is never read
    where = Path(cfg.root).resolve()
    if not any(where.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise RunRefused(
            f"data.root: {cfg.root} ({where}) is outside the folders this service may read "
            f"({allowed}); use a folder under one of them, or add it to service.data_roots"
        )
    try:
        check_present(cfg)
    except DataError as exc:
        raise RunRefused(f"data.root: {exc}") from None


def check_stages(cfg: Config) -> None:
    """An integer pipeline.stages must not exceed the model's blocks (one block a stage at
    least); "auto" picks a count that fits."""
    k = cfg.pipeline.stages
    if not isinstance(k, int) or k == 1:
        return
    blocks = model_blocks(cfg)
    if k > blocks:
        raise RunRefused(
            f"pipeline.stages: {k} stages for a model of {blocks} blocks; use at most {blocks} "
            '(or "auto")'
        )


def memory_budget(cfg: ServiceConfig) -> int:
    """service.max_run_memory_gib in bytes; 0: half of this machine's memory."""
    if cfg.max_run_memory_gib > 0:
        return int(cfg.max_run_memory_gib * GIB)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def check_memory(cfg: Config, budget: int) -> MemoryEstimate:
    estimate = estimate_memory(cfg)
    if estimate.total > budget:
        raise OverBudget(
            f"the run needs {estimate.describe()}, over this "
            f"service's budget of {budget / GIB:.1f} GiB (service.max_run_memory_gib); lower "
            "model.width, train.batch_size or raise pipeline.micro_batches"
        )
    return estimate


def admit(cfg: Config, roots: list[Path], budget: int) -> MemoryEstimate:
    """Every check a request must pass, cheapest first; the run's memory estimate."""
    check_request(cfg)
    check_packages(cfg)  # train.trackers' packages (a ConfigError naming the extra)
    check_data(cfg.data, roots)
    check_stages(cfg)
    return check_memory(cfg, budget)
