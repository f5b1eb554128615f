"""Train one run to the end (the controller's lifecycle, driven to completion)."""

from __future__ import annotations

import logging
from pathlib import Path

from driver.api.metrics import Metrics, MetricsServer
from driver.config import Config
from driver.data.common import DatasetSplits
from driver.run.controller import Controller
from driver.run.progress import Progress, bar_wanted
from driver.run.run_log import RunLog

log = logging.getLogger(__name__)


def train(
    cfg: Config,
    *,
    quiet: bool = False,
    progress: bool = False,
    out_dir: Path | None = None,
    splits: DatasetSplits | None = None,
    track_test: bool = False,
    resume: str | Path | None = None,
) -> RunLog:
    """Train `cfg.rule` on `cfg.model` and `cfg.data`; return (and write) its curves.

    Progress shows as a bar when stderr is a terminal or `progress` asks for one, else as a log
    line every train.log_every steps; `quiet` never shows a bar. `track_test` also records test
    accuracy after every epoch (benchmarks measure convergence with it; model selection only
    ever looks at validation). `resume` continues from a checkpoint file (or a run's checkpoint
    directory) at its exact step and data position. Raises RunFailed when the run ends failed."""
    metrics = server = None
    if cfg.metrics.enabled:
        metrics = Metrics()
        server = MetricsServer(metrics, cfg.metrics.addr, cfg.metrics.port)
        log.info("metrics at %s", server.url)
    try:
        ctl = Controller(
            cfg,
            out_dir=out_dir,
            splits=splits,
            resume=resume,
            track_test=track_test,
            metrics=metrics,
            callbacks=[Progress(bar=not quiet and bar_wanted(progress))],
        )
        return ctl.run_to_end()
    finally:
        if server is not None:
            server.close()
