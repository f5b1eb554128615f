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

from driver.api.metrics import RUN_STATES, Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.config import load_config
from driver.data.load import load_dataset
from driver.run.controller import Controller

MON = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = json.loads((MON / "grafana-dashboard.json").read_text())
QUERIES = [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p["targets"]]
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
PANELS = {p["title"]: p for p in DASHBOARD["panels"]}
RUN = "dash1"
K8S = MON.parent / "k8s"


def _rate_interval() -> str:
    """$__rate_interval as Grafana resolves it for the service's PodMonitor: four scrape
    intervals (its floor; the dashboard's own step is smaller at the default hour)."""
    monitors = yaml.safe_load_all((K8S / "podmonitor.yaml").read_text())
    service = next(m for m in monitors if m["metadata"]["name"] == "reclra-service")
    interval = service["spec"]["podMetricsEndpoints"][0]["interval"]
    assert interval.endswith("s"), interval
    return f"{4 * int(interval[:-1])}s"


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
    assert {"run", "stage"} <= names
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
        "stages",
        "backprop cosine",
    ):
        assert word in titles, word
    exprs = " ".join(expr for _, expr in QUERIES)
    assert "reclra_stages{" in exprs and "reclra_layer_backprop_cosine{" in exprs


def test_dashboard_queries_follow_grafana_conventions():
    """Rates over $__rate_interval (no hard-coded window), every per-stage and per-layer series
    filtered by the $stage variable, and the run state shown by name through value mappings."""
    for title, expr in QUERIES:
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert all(w == "$__rate_interval" for w in windows), (title, windows)
        for metric in re.findall(r"reclra_(?:stage|layer)_[a-z_]+", expr):
            assert re.search(metric + r'\{[^}]*stage=~"\$stage"', expr), (title, metric)
    stage = VARIABLES["stage"]
    assert stage["multi"] and stage["includeAll"] and "$run" in stage["definition"]
    panel = PANELS["Run state"]
    (target,) = panel["targets"]
    assert target["expr"] == 'reclra_run_state{run=~"$run"} == 1'  # the Enum's current state
    assert panel["options"]["reduceOptions"]["fields"] == "/^reclra_run_state$/"
    assert target["instant"] and target["format"] == "table"  # labels as columns, one row a run
    assert panel["fieldConfig"]["defaults"]["displayName"] == "${__data.fields.run}"
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    assert mapping["type"] == "value"
    assert list(mapping["options"]) == list(RUN_STATES)  # every state, in lifecycle order
    assert mapping["options"]["failed"]["color"] == "red"
    assert mapping["options"]["succeeded"]["color"] == "green"


def test_alert_rules_name_only_real_run_states():
    text = (MON / "prometheusrule.yaml").read_text() + (MON / "rules_test.yaml").read_text()
    named = set(re.findall(r'reclra_run_state="(\w+)"', text))
    named |= set(re.findall(r"reclra_run_state: (\w+)", text))
    assert named and named <= set(RUN_STATES), named - set(RUN_STATES)
    assert not re.search(r"reclra_run_state(\{[^}]*\})? *== *[02-9]", text)  # no state codes


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
                "train.diagnose_every=5",  # the backprop cosine panel's series
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


def _label_values(base: str, definition: str) -> list[str]:
    """A `label_values(selector, label)` variable as Grafana's Prometheus source resolves it:
    the label's values among the series the selector matches (the series API)."""
    m = re.fullmatch(r"label_values\((.+), *(\w+)\)", definition)
    assert m, definition
    selector, label = m.group(1).replace("$run", RUN), m.group(2)
    query = urllib.parse.urlencode({"match[]": selector})
    reply = _get(f"{base}/api/v1/label/{label}/values?{query}")
    assert reply["status"] == "success", reply
    return reply["data"]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(scraped_run):
    base, exported = scraped_run
    names = set(re.findall(r"^(reclra_[a-z_]+)", exported, re.M))
    assert RUN in _label_values(base, VARIABLES["run"]["definition"])
    stages = _label_values(base, VARIABLES["stage"]["definition"])
    assert stages == ["0", "1"]
    # Grafana writes a multi-value variable into a regex matcher as (v1|v2)
    values = {"$run": RUN, "$stage": "(" + "|".join(stages) + ")"}
    values["$__rate_interval"] = _rate_interval()
    empty = []
    for title, expr in QUERIES:
        for metric in re.findall(r"reclra_[a-z_]+", expr):
            assert metric in names, f"{title}: {metric} is not exported"
        q = expr
        for name, value in values.items():
            q = q.replace(name, value)
        assert "$" not in q, q
        reply = _get(f"{base}/api/v1/query?query={urllib.parse.quote(q)}")
        assert reply["status"] == "success", (title, reply)
        if not reply["data"]["result"]:
            empty.append(title)
    assert not empty, f"panels without data: {empty}"
    # the state panel's one series per run is the Enum's current state, named in its label
    (series,) = _query(base, 'reclra_run_state{run=~"' + RUN + '"} == 1')
    assert series["metric"]["reclra_run_state"] == "succeeded"
    # one stage chosen: the per-stage panels narrow to it
    only = _query(base, 'reclra_stage_in_flight_micro_batches{run=~"' + RUN + '", stage=~"(1)"}')
    assert [r["metric"]["stage"] for r in only] == ["1"]


def _query(base: str, q: str) -> list[dict]:
    reply = _get(f"{base}/api/v1/query?query={urllib.parse.quote(q)}")
    assert reply["status"] == "success", reply
    return reply["data"]["result"]
