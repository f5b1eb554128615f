"""Experiment trackers (train.trackers): a real digits run logs to TensorBoard and MLflow, and
what they wrote, read back with each tool's own reader, matches the run's metrics.json."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

from driver.config import ConfigError, config_to_dict, load_config, parse_config
from driver.run.callbacks import Callback, RunView
from driver.run.controller import Controller
from driver.run.errors import RunFailed
from driver.run.train import train

TRACKED = [
    "model.name=mlp",
    "model.hidden=32",
    "train.epochs=2",
    "train.batch_size=128",
    "train.log_every=3",
    "train.eval_every_steps=4",
    "train.compare=[]",
    'train.trackers=["tensorboard", "mlflow"]',
]


def tracked_config(*more: str):
    return load_config(None, [*TRACKED, *more])


def scalars(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def mlflow_client(store: Path) -> Any:
    """A reader of a run's file store (MLflow 3 opens one only when MLFLOW_ALLOW_FILE_STORE is
    true: the reader's opt-in, as docs/python.md says)."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        return MlflowClient(tracking_uri=store.resolve().as_uri())
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


class Kept(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def tracked(digits, tmp_path_factory):
    """One tracked run (2 epochs, validation every 4 steps, alignment every 3, test per epoch)
    with no MLflow variable set; every warning and log record it raised."""
    out = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        import mlflow.tracking  # noqa: F401  (its logger, which does not propagate, exists now)

        handler = Kept()
        records = handler.records
        for name in ("", "mlflow"):
            logging.getLogger(name).addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run = train(
                    tracked_config(), quiet=True, out_dir=out, splits=digits, track_test=True
                )
        finally:
            for name in ("", "mlflow"):
                logging.getLogger(name).removeHandler(handler)
        env_after = "MLFLOW_ALLOW_FILE_STORE" in os.environ
    saved = json.loads((out / "rec_lra" / "metrics.json").read_text())
    return {
        "run": run,
        "out": out / "rec_lra",
        "saved": saved,
        "warnings": caught,
        "records": records,
        "env_after": env_after,
    }


def test_tensorboard_scalars_match_metrics_json(tracked):
    saved, acc = tracked["saved"], scalars(tracked["out"] / "tb")
    epochs = saved["epochs"]
    assert len(epochs) == 2 and saved["steps"] > 8
    tags = set(acc.Tags()["scalars"])
    for key in ("epoch", "train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "seconds"):
        points = acc.Scalars(f"epoch/{key}")
        assert [p.value for p in points] == pytest.approx([e[key] for e in epochs], rel=1e-6), key
    ends = [p.step for p in acc.Scalars("epoch/val_acc")]
    assert ends[-1] == saved["steps"] and ends == sorted(set(ends))  # each epoch at its last step
    for key in ("val_acc", "val_loss"):
        points = acc.Scalars(f"evals/{key}")
        assert [p.step for p in points] == [e["step"] for e in saved["evals"]], key
        assert [p.value for p in points] == pytest.approx([e[key] for e in saved["evals"]])
    records = saved["alignment"]
    assert len(records) >= 4
    for layer in records[-1]["synapse_angle_deg"]:
        tag = f"alignment/synapse_angle_deg/{layer}"
        want = [
            (r["step"], r["synapse_angle_deg"][layer])
            for r in records
            if layer in r["synapse_angle_deg"]
        ]
        got = [(p.step, p.value) for p in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    for stat, value in saved["stages"]["0"].items():
        points = acc.Scalars(f"stages/0/{stat}")
        assert len(points) == len(epochs) and points[-1].value == pytest.approx(value, rel=1e-6)
    assert acc.Scalars("final/test_acc")[0].value == pytest.approx(saved["test_acc"], rel=1e-6)
    assert {"final/steps", "final/samples_per_second", "final/wall_seconds"} <= tags


def test_tensorboard_config_text_and_hparams(tracked):
    from tensorboard.plugins.hparams import plugin_data_pb2

    saved, acc = tracked["saved"], scalars(tracked["out"] / "tb")
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    toml = "\n".join(line[4:] for line in text.splitlines())  # a markdown code block
    assert json.loads(json.dumps(config_to_dict(parse_config(toml)))) == saved["config"]
    outcome = acc.Tensors("outcome/text_summary")[0].tensor_proto.string_val[0].decode()
    assert outcome == "succeeded"
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optim.lr"].number_value == saved["config"]["optim"]["lr"]
    assert hparams["model.name"].string_value == "mlp"
    assert hparams["train.trackers"].string_value == '["tensorboard", "mlflow"]'


def test_mlflow_run_matches_metrics_json(tracked):
    saved = tracked["saved"]
    client = mlflow_client(tracked["out"] / "mlruns")
    experiment = client.get_experiment_by_name("reclra")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "rec_lra"
    assert run.data.tags["reclra.rule"] == "rec_lra"
    rid = run.info.run_id
    for key in ("train_acc", "val_acc", "val_loss", "test_acc"):
        history = client.get_metric_history(rid, f"epoch/{key}")
        assert [m.value for m in history] == [e[key] for e in saved["epochs"]], key
    history = client.get_metric_history(rid, "evals/val_acc")
    assert [(m.step, m.value) for m in history] == [
        (e["step"], e["val_acc"]) for e in saved["evals"]
    ]
    angles = client.get_metric_history(rid, "alignment/synapse_angle_deg/head.fc")
    assert [m.step for m in angles] == [r["step"] for r in saved["alignment"]]
    assert run.data.metrics["final/test_acc"] == saved["test_acc"]
    params = run.data.params
    flat = {f"{s}.{k}": v for s, values in saved["config"].items() for k, v in values.items()}
    assert set(params) == set(flat)
    for key, value in flat.items():  # strings as they are, everything else as TOML text
        read = params[key] if isinstance(value, str) else tomllib.loads(f"v = {params[key]}")["v"]
        assert read == value, key
    local = client.download_artifacts(rid, "config.toml", str(tracked["out"] / "dl"))
    recorded = parse_config(Path(local).read_text())
    assert json.loads(json.dumps(config_to_dict(recorded))) == saved["config"]


def test_trackers_stay_quiet_and_leave_the_environment(tracked):
    """No warning from MLflow or TensorBoard reaches the user's log, nothing of theirs is
    logged, and MLflow's file-store opt-in was only lent to its own calls."""
    noisy = [
        str(w.message)
        for w in tracked["warnings"]
        if any(part in w.filename for part in ("mlflow", "tensorboard", "trackers"))
    ]
    assert not noisy, noisy
    loud = [  # MLflow's own handler prints INFO and up to stderr
        r.getMessage()
        for r in tracked["records"]
        if (r.levelno >= logging.INFO and r.name.startswith(("mlflow", "tensorboard")))
        or (r.levelno >= logging.WARNING and r.name.startswith("driver.run.trackers"))
    ]
    assert not loud, loud
    assert not tracked["env_after"]


@pytest.mark.parametrize(
    "tracker, blocked",
    [
        ("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
        ("mlflow", ("mlflow", "mlflow.tracking")),
    ],
)
def test_missing_package_is_one_line_naming_the_extra(tracker, blocked, tmp_path, monkeypatch):
    """A tracker whose package is absent stops the run as it is made, before anything is
    written. Absence is simulated by a None entry in sys.modules: the import system then raises
    ImportError exactly as for a package that is not installed, and the shared venv (which has
    both packages) cannot lose one for a test."""
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = load_config(None, ["train.compare=[]", f'train.trackers=["{tracker}"]'])
    with pytest.raises(ConfigError) as caught:
        Controller(cfg, out_dir=tmp_path)
    message = str(caught.value)
    assert f"pip install 'reclra[{tracker}]'" in message and "\n" not in message
    assert message.startswith("train.trackers:")
    with pytest.raises(ConfigError):
        train(cfg, quiet=True, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_remote_out_dir_without_a_server_is_refused(tracker, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ['train.out_dir="memory://runs"', f'train.trackers=["{tracker}"]'])
    with pytest.raises(ConfigError, match=f"train.trackers: {tracker}.*memory://runs"):
        Controller(cfg)


def test_mlflow_file_store_refused_by_the_user_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    cfg = load_config(None, ['train.trackers=["mlflow"]'])
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=false; unset it"):
        Controller(cfg, out_dir=tmp_path)


def test_unreachable_tracking_server_fails_the_run_at_its_start(digits, tmp_path, monkeypatch):
    """A tracker that cannot start fails the run before its first step, in one line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = tracked_config('train.trackers=["mlflow"]')
    with pytest.raises(
        RunFailed, match=r"train.trackers: mlflow could not start logging to http://127.0.0.1:9"
    ):
        train(cfg, quiet=True, out_dir=tmp_path, splits=digits)
    saved = json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())
    assert saved["steps"] == 0 and "could not start" in saved["error"]


class DeleteStore(Callback):
    """After the first epoch, the MLflow store disappears from under the run."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        if entry["epoch"] == 1:
            shutil.rmtree(self.store)


def test_a_tracker_failing_mid_run_stops_with_a_warning(digits, tmp_path, monkeypatch, caplog):
    """The run goes on (metrics.json keeps every curve); the tracker says once that it stopped,
    and the other tracker logs to the end."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "rec_lra" / "mlruns"
    with caplog.at_level(logging.WARNING, logger="driver.run.trackers"):
        run = train(
            tracked_config(),
            quiet=True,
            out_dir=tmp_path,
            splits=digits,
            callbacks=[DeleteStore(store)],
        )
    assert len(run.epochs) == 2 and run.test_acc is not None
    stopped = [r.getMessage() for r in caplog.records if "stopped logging" in r.getMessage()]
    assert len(stopped) == 1 and "mlflow stopped logging to file://" in stopped[0]
    acc = scalars(tmp_path / "rec_lra" / "tb")
    assert len(acc.Scalars("epoch/val_acc")) == 2 and acc.Scalars("final/test_acc")


def test_tensorboard_restart_drops_the_replayed_points(tmp_path):
    """After a restart from step 5, TensorBoard shows the replay's points 6-10, not the first
    attempt's: the sink writes a session start that TensorBoard's reader honours."""
    from driver.run.callbacks import RunState
    from driver.run.trackers.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    sink.open(load_config(), "rec_lra")
    for step in range(1, 11):
        sink.scalars({"epoch/val_acc": 0.1}, step)
    sink.restart(5)
    for step in range(6, 11):
        sink.scalars({"epoch/val_acc": 0.9}, step)
    sink.close(RunState.SUCCEEDED, None, {})
    points = scalars(tmp_path / "tb").Scalars("epoch/val_acc")
    assert [p.step for p in points] == list(range(1, 11))
    assert [round(p.value, 1) for p in points] == [0.1] * 5 + [0.9] * 5


SERVED = """
[model]
name = "mlp"
hidden = 16
[train]
epochs = 1
max_steps = 4
batch_size = 64
trackers = ["tensorboard"]
"""


def test_a_served_run_logs_to_its_trackers_in_its_own_process(tmp_path):
    """The run's process makes its Controller, and with it the trackers: the event files land
    in the run's folder, with the run's epochs."""
    from driver.api.service import Client, Service, messages
    from driver.config.service import ServiceConfig

    svc = Service(ServiceConfig(port=0, token="t", runs_dir=str(tmp_path), watch_interval_s=0))
    client = Client(f"127.0.0.1:{svc.port}", "t")
    try:
        client.call("StartRun", messages.StartRunRequest(config_toml=SERVED, run_id="tracked"))
        end = list(client.watch("tracked", timeout=180.0))[-1].run
        assert end.state == "succeeded", end.error
        saved = json.loads((Path(end.out_dir) / "metrics.json").read_text())
        points = scalars(Path(end.out_dir) / "tb").Scalars("epoch/val_acc")
        assert [p.value for p in points] == pytest.approx([e["val_acc"] for e in saved["epochs"]])
    finally:
        client.close()
        svc.stop()


def test_the_service_refuses_a_run_whose_tracker_is_missing(tmp_path, monkeypatch):
    """Admission imports the trackers' packages before any process starts: INVALID_ARGUMENT
    naming the extra (absence simulated as above, in the service's process)."""
    from driver.api.service import Client, RpcError, Service, StatusCode, messages
    from driver.config.service import ServiceConfig

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    svc = Service(ServiceConfig(port=0, token="t", runs_dir=str(tmp_path), watch_interval_s=0))
    client = Client(f"127.0.0.1:{svc.port}", "t")
    try:
        with pytest.raises(RpcError) as caught:
            client.call("StartRun", messages.StartRunRequest(config_toml=SERVED, run_id="x"))
        assert caught.value.code() == StatusCode.INVALID_ARGUMENT
        assert "pip install 'reclra[tensorboard]'" in caught.value.details()
        assert list(tmp_path.iterdir()) == []
    finally:
        client.close()
        svc.stop()


class FailAfterFirstEpoch(Callback):
    def after_epoch(self, ctl: RunView, entry: dict[str, Any]) -> None:
        raise ValueError("the user's callback gave up")


def test_a_failed_run_ends_failed_in_both_trackers(digits, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RunFailed, match="gave up"):
        train(
            tracked_config(),
            quiet=True,
            out_dir=tmp_path,
            splits=digits,
            callbacks=[FailAfterFirstEpoch()],
        )
    acc = scalars(tmp_path / "rec_lra" / "tb")
    outcome = acc.Tensors("outcome/text_summary")[0].tensor_proto.string_val[0].decode()
    assert outcome.startswith("failed: ") and "gave up" in outcome
    assert len(acc.Scalars("epoch/val_acc")) == 1 and "final/test_acc" not in acc.Tags()["scalars"]
    client = mlflow_client(tmp_path / "rec_lra" / "mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("reclra").experiment_id])
    assert run.info.status == "FAILED" and "gave up" in run.data.tags["reclra.error"]
