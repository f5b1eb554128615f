"""Experiment trackers a run logs to (train.trackers): TensorBoard and MLflow.

One callback (series.py) turns the run's hooks into named scalars, its config into params and
its end into a status; a sink per tracker writes them (tensorboard.py, mlflow.py). Each tracker's
package is an extra, checked when the run is made: a missing one is a one-line error naming
the extra, never a failure mid-run.
"""

from __future__ import annotations

import importlib

from driver.config import Config, ConfigError
from driver.run.callbacks import Callback
from driver.run.storage import Location
from driver.run.trackers.mlflow import MlflowSink
from driver.run.trackers.series import TrackerCallback
from driver.run.trackers.tensorboard import TensorBoardSink

__all__ = ["check_packages", "tracker_callbacks"]

# the module each tracker writes through, imported when its run is made
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking"}


def check_packages(cfg: Config) -> None:
    """Import each tracker's package now; a missing one raises ConfigError naming its extra."""
    for name in cfg.train.trackers:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise ConfigError(
                f"train.trackers: {name} needs its package, which is not installed; "
                f"pip install 'reclra[{name}]' (or drop {name!r} from train.trackers)"
            ) from None


def tracker_callbacks(cfg: Config, out: Location) -> list[Callback]:
    """The callbacks of the trackers cfg.train.trackers names, writing under `out` (the run's
    folder, train.out_dir/<rule>). Raises ConfigError (one line) for a missing package or an
    out_dir a tracker cannot write to."""
    check_packages(cfg)
    callbacks: list[Callback] = []
    for name in cfg.train.trackers:
        sink = TensorBoardSink.under(out) if name == "tensorboard" else MlflowSink.under(out)
        callbacks.append(TrackerCallback(sink))
    return callbacks
