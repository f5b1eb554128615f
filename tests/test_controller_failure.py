"""Every error raised while a run steps ends in `failed` through one path: the state gauge, the
run log and the service all see it, and the runner is closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures_data import write_idx_mnist
from prometheus_client.parser import text_string_to_metric_families
from torch.utils.data import Dataset

from driver.api.metrics import Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config import load_config
from driver.config.service import ServiceConfig
from driver.data.load import load_dataset
from driver.run.callbacks import Callback
from driver.run.controller import Controller, RunFailed, RunState

# passes admission (the files are there, by name), then fails as the run reads them: the
# training images file is cut short
CRASH = """
[model]
width = 4
[data]
name = "fashion_mnist"
root = "{root}"
val_size = 16
[train]
epochs = 1
batch_size = 64
"""
# a cut the model cannot take: refused at admission now (it used to fail in `starting`)
UNCUT = """
[model]
width = 4
[pipeline]
stages = 2
backend = "local"
boundaries = [9]
"""


def _state_gauge(url: str, run: str) -> str:
    """The run's state in /metrics: the reclra_run_state Enum's series that is 1."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "reclra_run_state" and s.labels["run"] == run and s.value == 1:
                return s.labels["reclra_run_state"]
    raise AssertionError(f"no reclra_run_state for run {run!r}")


def test_a_served_run_that_crashes_reads_failed_in_metrics_and_get_run(tmp_path):
    raw = write_idx_mnist(tmp_path / "data", "FashionMNIST", n_train=96, n_test=16)
    images = next(raw.glob("train-images*"))
    images.write_bytes(images.read_bytes()[:100])
    metrics = Metrics()
    endpoint = MetricsServer(metrics)  # 127.0.0.1, a free port
    cfg = ServiceConfig(
        port=0, token="t0k", runs_dir=str(tmp_path / "runs"), data_roots=(str(tmp_path),)
    )
    svc = Service(cfg, metrics)
    client = Client(f"127.0.0.1:{svc.port}", "t0k")
    try:
        with pytest.raises(RpcError) as info:
            client.call("StartRun", messages.StartRunRequest(config_toml=UNCUT, run_id="uncut"))
        assert info.value.code() == StatusCode.INVALID_ARGUMENT
        assert "pipeline.boundaries" in info.value.details()
        toml = CRASH.format(root=tmp_path / "data")
        reply = client.call("StartRun", messages.StartRunRequest(config_toml=toml, run_id="crash"))
        final = list(client.watch(reply.run_id, timeout=300))[-1].run
        assert final.state == "failed"
        got = client.call("GetRun", messages.GetRunRequest(run_id="crash"))
        assert got.state == "failed"
        assert "fashion_mnist" in got.error and "\n" not in got.error, got.error
        assert _state_gauge(endpoint.url, "crash") == "failed"
        written = json.loads((Path(got.out_dir) / "metrics.json").read_text())
        assert written["error"] == got.error
    finally:
        client.close()
        svc.stop()
        endpoint.close()


class _BadLabels(Dataset):
    """The digits with a label no 10-class head has: a data error the run meets mid-epoch."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.inner[i][0], 99


def test_an_unexpected_error_while_running_fails_the_run_through_the_same_path(tmp_path):
    digits = load_dataset(load_config().data)
    cfg = load_config(None, ["model.width=4", "train.epochs=1", "train.compare=[]"])
    metrics = Metrics()
    server = MetricsServer(metrics)
    try:
        ctl = Controller(
            cfg,
            out_dir=tmp_path,
            splits=replace(digits, train=_BadLabels(digits.train)),
            run_id="bad",
            callbacks=[MetricsCallback(metrics, "bad")],
        )
        seen = []
        while not ctl.done:
            seen.append(ctl.step())
        assert seen[-2:] == [RunState.RUNNING, RunState.FAILED]  # failed at the first batch
        assert ctl.runner is None  # closed on the way into `failed`
        assert ctl.error and ctl.error.split(":")[0] in ("IndexError", "RuntimeError")
        assert _state_gauge(server.url, "bad") == "failed"
    finally:
        server.close()
    written = json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())
    assert written["error"] == ctl.error and written["steps"] == 0
    with pytest.raises(RunFailed, match=ctl.error.split(":")[0]) as info:
        ctl.run_to_end()  # already ended: reports the failure again, from its cause
    assert isinstance(info.value.__cause__, IndexError | RuntimeError)


def test_train_threads_apply_while_the_run_trains_and_are_restored(tmp_path):
    digits = load_dataset(load_config().data)
    cfg = load_config(
        None, ["model.width=4", "train.epochs=1", "train.max_steps=3", "train.threads=3"]
    )
    before = torch.get_num_threads()
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    during = []
    while not ctl.done:
        if ctl.step() is RunState.RUNNING:
            during.append(torch.get_num_threads())
    assert ctl.state is RunState.SUCCEEDED and during and set(during) == {3}
    assert torch.get_num_threads() == before != 3


def test_the_cli_reports_a_config_the_run_could_not_use_in_one_line(tmp_path):
    """A failed run whose cause is a bad config or data value exits 2 with `reclra: error:`,
    as before the run existed (the run's own failures exit 1)."""
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [
            *(sys.executable, "-m", "driver.cli", "train", "--quiet"),
            *("--set", "model.width=4", "--set", "train.compare=[]"),
            *("--set", "pipeline.stages=2", "--set", 'pipeline.backend="local"'),
            *("--set", "pipeline.boundaries=[9]"),
            *("--set", f"train.out_dir={json.dumps(str(tmp_path / 'runs'))}"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},  # this checkout's driver
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("reclra: error: pipeline.boundaries"), p.stderr


class _Broken(Callback):
    """An observer with a bug: it raises on entering `running`."""

    def after_transition(self, ctl, previous, current) -> None:
        if current is RunState.RUNNING:
            raise KeyError("oops")


def test_a_callback_that_raises_fails_the_run_and_the_others_see_it(tmp_path):
    digits = load_dataset(load_config().data)
    cfg = load_config(None, ["model.width=4", "train.epochs=1", "train.compare=[]"])
    seen: list[tuple[RunState, RunState]] = []

    class Watch(Callback):
        def after_transition(self, ctl, previous, current) -> None:
            seen.append((previous, current))

    ctl = Controller(cfg, out_dir=tmp_path, splits=digits, callbacks=[_Broken(), Watch()])
    with pytest.raises(RunFailed, match="KeyError: 'oops'"):
        ctl.run_to_end()
    assert ctl.runner is None and seen[-1] == (RunState.RUNNING, RunState.FAILED)
    assert json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())["error"] == ctl.error
