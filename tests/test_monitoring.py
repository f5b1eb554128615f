"""Alert rules pass promtool; every dashboard query returns data from a real Prometheus
scraping a real training run, and names only metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from driver.api.metrics import Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.config import load_config
from driver.data.load import load_dataset
from driver.run.controller import Controller

MON = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = json.loads((MON / "grafana-dashboard.json").read_text())
QUERIES = [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]
RUN = "dash1"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian: apt-get install prometheus); .ci/run installs it"
        )
    return path


@pytest.fixture
def rule_dir(tmp_path):
    spec = yaml.safe_load((MON / "prometheusrule.yaml").read_text())["spec"]
    (tmp_path / "reclra-rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(MON / "rules_test.yaml", tmp_path / "rules_test.yaml")
    return tmp_path


def test_alert_rules_pass_promtool_check_and_unit_tests(rule_dir):
    promtool = _tool("promtool")
    for args in (["check", "rules", "reclra-rules.yaml"], ["test", "rules", "rules_test.yaml"]):
        p = subprocess.run(
            [promtool, *args], cwd=rule_dir, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0, p.stdout + p.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((rule_dir / "reclra-rules.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = set(re.findall(r"alertname: (\w+)", (rule_dir / "rules_test.yaml").read_text()))
    assert (
        alerts
        == tested
        == {
            "ReclraStageStalled",
            "ReclraThroughputDropped",
            "ReclraRestartsRising",
            "ReclraRunFailed",
        }
    )


def test_a_wrong_expectation_fails_promtool(rule_dir):
    promtool = _tool("promtool")
    text = (
        (rule_dir / "rules_test.yaml")
        .read_text()
        .replace('summary: "Run r1 failed"', 'summary: "Run r1 is fine"')
    )
    (rule_dir / "rules_test.yaml").write_text(text)
    p = subprocess.run(
        [promtool, "test", "rules", "rules_test.yaml"],
        cwd=rule_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0


def test_dashboard_has_the_run_variable_and_the_promised_panels():
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert "run" in names
    assert all("$run" in expr for _, expr in QUERIES)
    titles = " ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for word in (
        "state",
        "samples",
        "step time",
        "forward",
        "staleness",
        "local loss",
        "update norm",
        "accuracy",
        "restarts",
        "checkpoint age",
        "early-exit accuracy per stage",
    ):
        assert word in titles, word


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


@pytest.fixture
def scraped_run(tmp_path):
    """A real two-stage training run, its /metrics scraped every second by a real Prometheus.
    Decoupled, so that its stages have early exits for their panel to show (the other panels'
    series are every rule's)."""
    prometheus = _tool("prometheus")
    metrics = Metrics()
    endpoint = MetricsServer(metrics)
    port = _free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "reclra",
                        "static_configs": [{"targets": [f"127.0.0.1:{endpoint.port}"]}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.5)
        cfg = load_config(
            None,
            [
                'rule.preset="decoupled"',
                "model.width=4",
                "train.epochs=4",
                "train.batch_size=64",
                "train.compare=[]",
                "pipeline.stages=2",
                'pipeline.backend="local"',
                "pipeline.boundaries=[2]",
                "pipeline.micro_batches=2",
                "train.checkpoint_every=20",
            ],
        )
        ctl = Controller(
            cfg,
            out_dir=tmp_path / "run",
            splits=load_dataset(cfg.data),
            run_id=RUN,
            callbacks=[MetricsCallback(metrics, RUN)],
        )
        t0 = time.monotonic()
        while not ctl.done:
            ctl.step()
            if ctl.state.value == "running" and ctl.run.steps % 5 == 0:
                time.sleep(0.1)  # let the scrapes see the run while it trains
        assert ctl.state.value == "succeeded"
        time.sleep(max(0.0, 8 - (time.monotonic() - t0)) + 3)  # scrapes after the end
        exported = urllib.request.urlopen(endpoint.url, timeout=10).read().decode()
        yield base, exported
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        endpoint.close()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped_run):
    base, exported = scraped_run
    names = set(re.findall(r"^(reclra_[a-z_]+)", exported, re.M))
    empty = []
    for title, expr in QUERIES:
        for metric in re.findall(r"reclra_[a-z_]+", expr):
            assert metric in names, f"{title}: {metric} is not exported"
        q = expr.replace("$run", RUN)
        reply = _get(f"{base}/api/v1/query?query={urllib.parse.quote(q)}")
        assert reply["status"] == "success", (title, reply)
        if not reply["data"]["result"]:
            empty.append(title)
    assert not empty, f"panels without data: {empty}"
