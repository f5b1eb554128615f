"""Train one run to the end (the controller's lifecycle, driven to completion)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from driver.config import Config
from driver.data.common import DatasetSplits
from driver.run import storage
from driver.run.callbacks import Callback
from driver.run.controller import Controller
from driver.run.progress import Progress, bar_wanted
from driver.run.run_log import RunLog

log = logging.getLogger(__name__)


def train(
    cfg: Config,
    *,
    quiet: bool = False,
    progress: bool = False,
    out_dir: str | Path | None = None,
    splits: DatasetSplits | None = None,
    track_test: bool = False,
    resume: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> RunLog:
    """Train `cfg.rule` on `cfg.model` and `cfg.data`; return (and write) its curves.

    Progress shows as a bar when stderr is a terminal or `progress` asks for one, else as a log
    line every train.log_every steps; `quiet` never shows a bar. `track_test` also records test
    accuracy after every epoch (benchmarks measure convergence with it; model selection only
    ever looks at validation). `resume` continues from a checkpoint file (or a run's checkpoint
    directory, a path or URI) at its exact step and data position. Raises RunFailed when the run
    ends failed. `out_dir` (default train.out_dir) may be a path or a URI (s3://bucket/runs).
    `callbacks` observe the run beside the progress (e.g. its Prometheus series)."""
    where = storage.join(out_dir or cfg.train.out_dir, cfg.rule.label)
    _say_where(cfg, where, "go to")
    try:
        ctl = Controller(
            cfg,
            out_dir=out_dir,
            splits=splits,
            resume=resume,
            track_test=track_test,
            callbacks=[Progress(bar=not quiet and bar_wanted(progress)), *callbacks],
        )
        return ctl.run_to_end()
    finally:
        _say_where(cfg, where, "are in")


def _say_where(cfg: Config, where: storage.Location, verb: str) -> None:
    """On a Ray cluster, a relative local out_dir lands in the driver's working directory (a
    Ray job's is deleted when the job ends): say where, on which host, at start and end."""
    on_cluster = bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    if on_cluster and isinstance(where, Path) and not where.is_absolute():
        log.warning(
            "%s: outputs %s %s, local to this driver; for outputs that outlive a Ray job set "
            "train.out_dir to shared storage (s3://bucket/runs, a mounted volume)",
            cfg.rule.label,
            verb,
            storage.describe(where),
        )
