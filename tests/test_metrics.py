"""The /metrics endpoint, scraped over real HTTP during a short real run."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driver.config import load_config
from driver.controller import Controller
from driver.data import load_dataset
from driver.metrics import STATE_CODES, Metrics, MetricsServer


@pytest.fixture(scope="module")
def digits():
    return load_dataset(load_config().data)


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


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
        ctl = Controller(cfg, out_dir=tmp_path, splits=digits, metrics=metrics, run_id="r1")
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
    assert _get(first, "reclra_run_state", run="r1") == STATE_CODES["running"]
    assert _get(last, "reclra_run_state", run="r1") == STATE_CODES["succeeded"]
    assert _get(second, "reclra_step_seconds_count", run="r1") == 15
    for stage in ("0", "1"):
        f1 = _get(first, "reclra_stage_forward_seconds_total", run="r1", stage=stage)
        f2 = _get(second, "reclra_stage_forward_seconds_total", run="r1", stage=stage)
        assert 0 < f1 < f2
        assert _get(second, "reclra_stage_received_bytes_total", run="r1", stage=stage) > 0
        assert _get(second, "reclra_stage_in_flight_micro_batches", run="r1", stage=stage) == 0
    assert _get(last, "reclra_layer_update_norm", run="r1", stage="0", layer="stem.conv") > 0
    assert _get(last, "reclra_layer_local_loss", run="r1", stage="1", layer="layer3.0.node1") >= 0
    assert 0.1 < _get(last, "reclra_test_accuracy_ratio", run="r1") <= 1
    assert 0.1 < _get(last, "reclra_validation_accuracy_ratio", run="r1") <= 1
    assert _get(last, "reclra_checkpoints_total", run="r1") >= 2  # step 0 (for recovery), 10, end
    assert _get(last, "reclra_last_checkpoint_timestamp_seconds", run="r1") > 1e9
    assert _get(last, "reclra_restarts_total", run="r1") == 0
    # naming rules: prefix, and labels run / stage / layer only (build info aside)
    for name, labels in last:
        assert name.startswith("reclra_"), name
        if not name.startswith("reclra_build"):
            assert {k for k, _ in labels} <= {"run", "stage", "layer", "le"}, (name, labels)
    assert any(name == "reclra_build_info" for name, _ in last)
