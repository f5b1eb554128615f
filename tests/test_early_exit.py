"""Early exits: a decoupled run's auxiliary head on each stage below the top is a classifier of
its own, and its accuracy is reported wherever accuracy is (metrics.json, /metrics, the report).

(a) A real decoupled run on K = 3 stages records each stage's early-exit accuracy at the test
    and at each epoch's validation, the same numbers a fresh in-process runner loaded with its
    final checkpoint gives; a run that is not decoupled records none.
(b) /metrics, scraped over HTTP, and `reclra report` show them per stage.
(c) On Ray, the stream and p2p engines' infer_exits are the in-process runner's, stage by stage.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from driver.api.metrics import Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.api.report import report
from driver.config import load_config
from driver.config.pipeline import PipelineConfig
from driver.data.load import make_loader
from driver.pipeline.build import base_spec
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.stream import RayPipeline
from driver.run import checkpoint_store
from driver.run.controller import Controller
from workers.chain import LocalRunner, stage_specs

DECOUPLED = ['rule.preset="decoupled"']
SMALL = [
    "model.width=4",
    "train.epochs=1",
    "train.batch_size=64",
    "train.compare=[]",
    'pipeline.backend="local"',
]
BOUNDS = [0, 1, 3, 5]  # stem | layer1.0, layer2.0 | layer3.0, head
EXIT_VAL, EXIT_TEST = (
    "reclra_stage_exit_validation_accuracy_ratio",
    "reclra_stage_exit_test_accuracy_ratio",
)


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _train(overrides: list[str], digits, out, run_id: str):  # noqa: ANN001, ANN202
    """A real run through the controller, its /metrics served on 127.0.0.1 and scraped over
    HTTP once it ends; (config, metrics.json, the scrape)."""
    cfg = load_config(None, [*SMALL, *overrides])
    metrics = Metrics()
    server = MetricsServer(metrics)
    try:
        ctl = Controller(
            cfg,
            out_dir=out,
            splits=digits,
            run_id=run_id,
            callbacks=[MetricsCallback(metrics, run_id)],
        )
        ctl.run_to_end()
        scraped = _scrape(server.url)
    finally:
        server.close()
    written = json.loads((out / cfg.rule.label / "metrics.json").read_text())
    return cfg, written, scraped


@pytest.fixture(scope="module")
def decoupled(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoupled")
    cfg, written, scraped = _train(
        [*DECOUPLED, "pipeline.stages=3", "pipeline.boundaries=[1, 3]"], digits, out, "dec"
    )
    return cfg, written, scraped, out


def _accuracies(runner: LocalRunner, ds) -> list[float]:  # noqa: ANN001
    """Each stage's early-exit accuracy over `ds`, counted here from infer_exits."""
    correct, n = [0] * len(runner.stages), 0
    for x, y in make_loader(ds, 256, shuffle=False, seed=0):
        for s, logits in enumerate(runner.infer_exits(x)):
            assert logits is not None, f"stage {s} has no early exit"
            correct[s] += int((logits.argmax(1) == y).sum())
        n += len(y)
    return [c / n for c in correct]


def test_a_decoupled_run_records_each_stages_early_exit(decoupled, digits):
    cfg, run, _, out = decoupled
    assert cfg.rule.label == "rec_lra_decoupled" and run["partition"] == BOUNDS
    exits, last = run["exit_test_acc"], run["epochs"][-1]
    assert len(exits) == 3 and exits[-1] == run["test_acc"]
    assert all(0.0 <= a <= 1.0 for a in exits)
    assert len(last["exit_val_acc"]) == 3 and last["exit_val_acc"][-1] == last["val_acc"]
    assert run["exit_val_acc"] == last["exit_val_acc"]  # the final validation's
    # the numbers are the heads': a fresh in-process runner with the run's final weights
    runner = LocalRunner(stage_specs(base_spec(cfg, digits), BOUNDS))
    runner.load_state_dict(checkpoint_store.load(out / cfg.rule.label / "checkpoints")["runner"])
    assert _accuracies(runner, digits.test) == exits
    assert _accuracies(runner, digits.val) == last["exit_val_acc"]


def test_the_metrics_endpoint_shows_each_stages_early_exit(decoupled):
    _, run, scraped, _ = decoupled
    for name, want in ((EXIT_TEST, run["exit_test_acc"]), (EXIT_VAL, run["exit_val_acc"])):
        got = [scraped[(name, (("run", "dec"), ("stage", str(s))))] for s in range(3)]
        assert got == want, name
    assert not any(n in (EXIT_TEST, EXIT_VAL) and ("stage", "3") in ls for n, ls in scraped)
    assert scraped[("reclra_test_accuracy_ratio", (("run", "dec"),))] == run["exit_test_acc"][-1]


def test_the_report_lists_each_stages_early_exit(decoupled, tmp_path):
    _, run, _, out = decoupled
    text = report(out, tmp_path).read_text()
    assert "## Early exits" in text
    for s, (test, val) in enumerate(zip(run["exit_test_acc"], run["exit_val_acc"], strict=True)):
        assert f"| rec_lra_decoupled | {s} | {test:.4f} | {val:.4f} |" in text


def test_a_run_that_is_not_decoupled_records_no_early_exits(digits, tmp_path):
    overrides = ["pipeline.stages=2", "pipeline.boundaries=[2]", "train.max_steps=2"]
    overrides.append('rule.preset="mirror"')  # chained (K > 1 is decoupled unless set)
    cfg, run, scraped = _train(overrides, digits, tmp_path, "plain")
    assert cfg.rule.label == "rec_lra" and run["test_acc"] is not None
    assert run["exit_test_acc"] is None and run["exit_val_acc"] is None
    assert all("exit_val_acc" not in e for e in run["epochs"]) and run["epochs"]
    assert not any(n in (EXIT_TEST, EXIT_VAL) for n, _ in scraped)
    assert "Early exits" not in report(tmp_path, tmp_path / "report").read_text()


@pytest.mark.ray
@pytest.mark.parametrize("engine", ["stream", "p2p"])
def test_infer_exits_on_ray_are_the_in_process_runners(cluster, digits, engine):
    cfg = load_config(None, [*SMALL, *DECOUPLED])
    specs = stage_specs(base_spec(cfg, digits), BOUNDS)
    local = LocalRunner(specs)
    batches = iter(make_loader(digits.train, 64, shuffle=False, seed=0))
    for _ in range(2):  # trained: the heads (initialised to zero) give logits of their own
        local.step(*next(batches))
    x, _ = next(iter(make_loader(digits.test, 128, shuffle=False, seed=0)))
    want = local.infer_exits(x)
    assert len(want) == 3 and all(w is not None for w in want)
    assert torch.equal(want[-1], local.infer(x))  # the last exit is the prediction
    pc = PipelineConfig(stages=3, engine=engine)
    remote = (P2PPipeline if engine == "p2p" else RayPipeline)(specs, pc)
    try:
        before = remote.infer_exits(x)  # as built: not the trained runner's
        assert any(not torch.equal(b, w) for b, w in zip(before, want, strict=True))
        remote.load_state_dict(local.state_dict())
        got = remote.infer_exits(x)
        assert len(got) == 3
        for s, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g is not None and w is not None and torch.equal(g, w), f"stage {s}"
        assert torch.equal(remote.infer(x), got[-1])
    finally:
        remote.close()
