"""The /metrics endpoint, scraped over real HTTP during a short real run, and the series of a
run the service forgets leaving it."""

from __future__ import annotations

import json
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from driver.api.metrics import RUN_STATES, Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.api.runs import Runs
from driver.config import load_config
from driver.config.service import ServiceConfig
from driver.run.callbacks import TERMINAL
from driver.run.controller import Controller


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


ANGLE, COSINE = "reclra_layer_synapse_angle_degrees", "reclra_layer_backprop_cosine"


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _state(samples: dict, run: str) -> str:
    """The run's state: reclra_run_state is an Enum, its current state's series 1, others 0."""
    values = {s: _get(samples, "reclra_run_state", run=run, reclra_run_state=s) for s in RUN_STATES}
    on = [s for s, v in values.items() if v == 1]
    assert len(on) == 1 and sum(values.values()) == 1, values
    return on[0]


def test_metrics_move_with_a_real_two_stage_run(digits, tmp_path):
    cfg = load_config(
        None,
        [
            "model.width=4",
            "train.epochs=1",
            "train.batch_size=64",
            "train.compare=[]",
            "pipeline.stages=2",
            'pipeline.backend="local"',
            "pipeline.boundaries=[2]",
            "train.checkpoint_every=10",
        ],
    )
    metrics = Metrics()
    server = MetricsServer(metrics)  # 127.0.0.1, a free port
    assert server.addr == "127.0.0.1"
    try:
        ctl = Controller(
            cfg,
            out_dir=tmp_path,
            splits=digits,
            run_id="r1",
            callbacks=[MetricsCallback(metrics, "r1")],
        )
        while ctl.run.steps < 5:
            ctl.step()
        first = _scrape(server.url)
        while ctl.run.steps < 15:
            ctl.step()
        second = _scrape(server.url)
        while not ctl.done:
            ctl.step()
        last = _scrape(server.url)
    finally:
        server.close()

    assert _get(first, "reclra_steps_total", run="r1") == 5
    assert _get(second, "reclra_steps_total", run="r1") == 15
    assert _get(last, "reclra_samples_total", run="r1") == len(digits.train)
    assert _state(first, "r1") == "running"
    assert _state(last, "r1") == "succeeded"
    assert _get(second, "reclra_step_seconds_count", run="r1") == 15
    for stage in ("0", "1"):
        f1 = _get(first, "reclra_stage_forward_seconds_total", run="r1", stage=stage)
        f2 = _get(second, "reclra_stage_forward_seconds_total", run="r1", stage=stage)
        assert 0 < f1 < f2
        assert _get(second, "reclra_stage_received_bytes_total", run="r1", stage=stage) > 0
        assert _get(second, "reclra_stage_in_flight_micro_batches", run="r1", stage=stage) == 0
        # a sync step holds its micro-batches until the learns: some bytes, none left after
        assert _get(second, "reclra_stage_cached_bytes", run="r1", stage=stage) > 0
    assert _get(last, "reclra_layer_update_norm", run="r1", stage="0", layer="stem.conv") > 0
    assert _get(last, "reclra_layer_local_loss", run="r1", stage="1", layer="layer3.0.node1") >= 0
    assert 0.1 < _get(last, "reclra_test_accuracy_ratio", run="r1") <= 1
    assert 0.1 < _get(last, "reclra_validation_accuracy_ratio", run="r1") <= 1
    assert _get(last, "reclra_checkpoints_total", run="r1") >= 2  # step 0 (for recovery), 10, end
    assert _get(last, "reclra_last_checkpoint_timestamp_seconds", run="r1") > 1e9
    assert _get(last, "reclra_restarts_total", run="r1") == 0
    head_angle = _get(last, ANGLE, run="r1", stage="1", layer="head.fc")
    assert 0 <= head_angle <= 180
    assert not any(name == COSINE for name, _ in last)  # diagnostics off
    # naming rules: prefix, and labels run / stage / layer only (build info aside; the state
    # Enum's own label is named after it, as OpenMetrics StateSets are)
    for name, labels in last:
        assert name.startswith("reclra_"), name
        if not name.startswith("reclra_build"):
            allowed = {"run", "stage", "layer", "le", "reclra_run_state"}
            assert {k for k, _ in labels} <= allowed, (name, labels)
    assert any(name == "reclra_build_info" for name, _ in last)


def test_alignment_gauges_in_a_real_scrape(digits, tmp_path):
    """Two stages in this process, diagnostics every 2 steps: both gauges are exported per stage
    and layer, during and after the run, and end at what metrics.json holds last."""
    cfg = load_config(
        None,
        [
            "model.width=4",
            "train.epochs=1",
            "train.max_steps=4",
            "train.compare=[]",
            "train.diagnose_every=2",
            "pipeline.stages=2",
            'pipeline.backend="local"',
            "pipeline.boundaries=[2]",
            'rule.topology="mirror"',  # chained: backprop's gradient is probed on every stage
        ],
    )
    metrics = Metrics()
    server = MetricsServer(metrics)
    try:
        ctl = Controller(
            cfg,
            out_dir=tmp_path,
            splits=digits,
            run_id="a1",
            callbacks=[MetricsCallback(metrics, "a1")],
        )
        while ctl.run.steps < 1:
            ctl.step()
        first = _scrape(server.url)
        while not ctl.done:
            ctl.step()
        last = _scrape(server.url)
    finally:
        server.close()
    for stage, layer in (("0", "layer1.0.conv1"), ("1", "layer3.0.conv2")):
        assert 0 <= _get(first, ANGLE, run="a1", stage=stage, layer=layer) <= 180
        assert -1 <= _get(first, COSINE, run="a1", stage=stage, layer=layer) <= 1 + 1e-6
    entry = json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())["alignment"][-1]
    assert entry["step"] == 4
    stage_of = {dict(lb)["layer"]: dict(lb)["stage"] for name, lb in last if name == COSINE}
    assert set(stage_of) == set(entry["backprop_cosine"]) and set(stage_of.values()) == {"0", "1"}
    for layer, v in entry["backprop_cosine"].items():
        assert _get(last, COSINE, run="a1", stage=stage_of[layer], layer=layer) == v
    for layer, v in entry["synapse_angle_deg"].items():
        assert _get(last, ANGLE, run="a1", stage=stage_of[layer], layer=layer) == v


SERVED = """
[model]
width = 4
[train]
epochs = 1
max_steps = 3
batch_size = 64
log_every = 1000
checkpoint_every = 2
[pipeline]
stages = 2
backend = "local"
boundaries = [2]
"""


def _runs_of(samples: dict) -> dict[str, set[str]]:
    """{run id: the metric names with a series labelled with it} in a scrape."""
    out: dict[str, set[str]] = {}
    for name, labels in samples:
        run = dict(labels).get("run")
        if run is not None:
            out.setdefault(run, set()).add(name)
    return out


def _finish(runs: Runs, run_id: str) -> None:
    handle = runs.start(SERVED, [], run_id)
    deadline = time.monotonic() + 180
    with handle.cond:
        while handle.state not in TERMINAL:
            assert time.monotonic() < deadline, f"run {run_id} did not end: {handle.state}"
            handle.cond.wait(1.0)
    assert handle.state.value == "succeeded", handle.fields()["error"]


def test_a_forgotten_run_leaves_metrics(tmp_path):
    """service.keep_finished = 1: when a second run finishes, the service forgets the first,
    and every series labelled with the first run's id leaves /metrics (scraped over HTTP);
    the second run's stay."""
    metrics = Metrics()
    server = MetricsServer(metrics)
    runs = Runs(ServiceConfig(runs_dir=str(tmp_path), keep_finished=1), metrics)
    try:
        _finish(runs, "old")
        before = _scrape(server.url)
        _finish(runs, "new")
        after = _scrape(server.url)
    finally:
        runs.close()
        server.close()
    held = _runs_of(before)["old"]
    # the run's own, per stage and per layer series were all there: the removal has work to do
    for name in (
        "reclra_run_state",
        "reclra_steps_total",
        "reclra_step_seconds_bucket",
        "reclra_stage_forward_seconds_total",
        "reclra_layer_local_loss",
        "reclra_test_accuracy_ratio",
        "reclra_stages",
        "reclra_last_checkpoint_timestamp_seconds",
    ):
        assert name in held, name
    assert _state(before, "old") == "succeeded"
    assert "old" not in _runs_of(after), sorted(_runs_of(after).get("old", ()))
    assert _runs_of(after)["new"] == held  # the same series, for the run still held
    assert _state(after, "new") == "succeeded"
    assert [h.run_id for h in runs.all()] == ["new"]
