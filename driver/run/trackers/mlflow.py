"""The MLflow tracker (extra reclra[mlflow]): a run in MLFLOW_TRACKING_URI's store, or by
default in a file store at train.out_dir/<rule>/mlruns.

Its experiment is MLFLOW_EXPERIMENT_NAME (default "reclra"), its run name the run's id (the
rule's label). Params: every resolved config key (section.key; lists and tables as TOML);
artifact config.toml: the resolved config as `reclra config` prints it; metrics: the scalars of
run/trackers/series.py; tag reclra.rule; status FINISHED, FAILED (tag reclra.error says why) or
KILLED (stopped).

MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is true (it prefers a database,
which mlflow-skinny cannot open without sqlalchemy). The file store is what this tracker
chose, so it passes that opt-in for its own calls only, never changing the process's
environment for longer; a MLFLOW_ALLOW_FILE_STORE the user set stays as set (false: the run
stops at its start, saying so).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from driver.config import Config, ConfigError
from driver.config.docs import describe, toml_value
from driver.run import storage
from driver.run.callbacks import RunState
from driver.run.storage import Location
from driver.run.trackers.series import params

EXPERIMENT = "reclra"
STATUS = {RunState.SUCCEEDED: "FINISHED", RunState.FAILED: "FAILED", RunState.STOPPED: "KILLED"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
PARAMS_PER_CALL, METRICS_PER_CALL = 100, 1000  # MLflow's limits on a log_batch call
_env_lock = threading.Lock()


class MlflowSink:
    """One MLflow run in the store at `uri` (run.trackers.series.Sink)."""

    name = "mlflow"

    def __init__(self, uri: str) -> None:
        self.uri = self.where = uri
        self.client: Any = None
        self.run: str | None = None

    @classmethod
    def under(cls, out: Location) -> MlflowSink:
        """The sink of a run writing to `out`: MLFLOW_TRACKING_URI, else a file store in its
        mlruns/ folder, which must be local."""
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        sink = cls(uri) if uri else None
        if sink is None and storage.is_remote(out):
            raise ConfigError(
                f"train.trackers: mlflow keeps its runs in a local folder unless "
                f"MLFLOW_TRACKING_URI names a tracking server, but the run writes to {out}; set "
                "MLFLOW_TRACKING_URI or a local train.out_dir"
            )
        sink = sink or cls((Path(out) / "mlruns").resolve().as_uri())
        refused = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "true").strip().lower()
        if sink.file_store and refused in ("false", "0"):
            raise ConfigError(
                f"train.trackers: mlflow's file store at {sink.uri} is refused by "
                f"MLFLOW_ALLOW_FILE_STORE={os.environ['MLFLOW_ALLOW_FILE_STORE']}; unset it, or "
                "set MLFLOW_TRACKING_URI to a tracking server or database"
            )
        return sink

    @property
    def file_store(self) -> bool:
        """Whether the store is a folder (file:// or a plain path), not a server or database."""
        return urlparse(self.uri).scheme in ("", "file") and self.uri != "databricks"

    @contextlib.contextmanager
    def _allowed(self) -> Iterator[None]:
        """MLflow's file store, opted into for the calls inside (see the module's doc)."""
        if not self.file_store or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
            yield
            return
        with _env_lock:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            try:
                yield
            finally:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)

    def open(self, cfg: Config, run_id: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        with self._allowed():
            self.client = client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else client.create_experiment(name)
            tags = {"reclra.rule": cfg.rule.label}
            self.run = client.create_run(experiment, run_name=run_id, tags=tags).info.run_id
            values = [Param(k, _param(v)) for k, v in params(cfg).items()]
            values = [p for p in values if len(p.value) <= MAX_PARAM_CHARS]  # all in config.toml
            for i in range(0, len(values), PARAMS_PER_CALL):
                client.log_batch(self.run, params=values[i : i + PARAMS_PER_CALL])
            client.log_text(self.run, describe(cfg), "config.toml")

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        with self._allowed():
            for i in range(0, len(metrics), METRICS_PER_CALL):
                self.client.log_batch(self.run, metrics=metrics[i : i + METRICS_PER_CALL])

    def restart(self, step: int) -> None:
        """MLflow keeps every point: the steps a restart replays appear twice in its history."""

    def flush(self) -> None:
        """Every call has written already."""

    def close(self, state: RunState, error: str | None, final: dict[str, float]) -> None:
        with self._allowed():
            if error is not None:
                self.client.set_tag(self.run, "reclra.error", error[:MAX_PARAM_CHARS])
            self.client.set_terminated(self.run, STATUS[state])


def _param(value: Any) -> str:
    """A config value as an MLflow param: a string as is, anything else as its TOML text."""
    return value if isinstance(value, str) else toml_value(value)
