"""Alignment on the driver side: metrics.json `alignment` from real runs (one process and a Ray
pipeline), and the error path chaining stage to stage while diagnostics probe backprop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import ray
import torch

from driver.api.metrics_callback import MetricsCallback
from driver.config import Config, load_config
from driver.config.pipeline import PipelineConfig
from driver.data.common import DatasetSplits
from driver.pipeline.build import base_spec
from driver.pipeline.stream import RayPipeline
from driver.run.controller import Controller
from driver.run.train import train
from workers.chain import LocalRunner, stage_specs
from workers.diagnostics import layer_items
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

TINY = ["train.epochs=1", "train.max_steps=6", "model.width=4", "train.compare=[]"]


def _layers(cfg: Config, digits: DatasetSplits) -> tuple[set[str], set[str]]:
    """(every layer, the layers with an error synapse) of the model `cfg` trains."""
    stage = Stage(base_spec(cfg, digits))
    items = list(layer_items(stage.block_list))
    return {n for n, _ in items}, {n for n, layer in items if layer.feedback is not None}


def _is_cosine(v: float) -> bool:
    """In [-1, 1], to float32 rounding (a cosine of two float32 tensors can read 1 + 1.2e-7)."""
    return math.isfinite(v) and abs(v) <= 1.0 + 1e-6


def _alignment(
    rule: str, digits: DatasetSplits, tmp_path: Path
) -> tuple[list[dict], set[str], set[str]]:
    cfg = load_config(
        None, [*TINY, f"rule.name={rule}", "train.diagnose_every=2", "train.log_every=1"]
    )
    train(cfg, quiet=True, out_dir=tmp_path, splits=digits)
    entries = json.loads((tmp_path / rule / "metrics.json").read_text())["alignment"]
    per_epoch = math.ceil(len(digits.train) / cfg.train.batch_size)
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]  # every log_every step, once
    for e in entries:
        assert e["epoch"] == pytest.approx(e["step"] / per_epoch)
    return entries, *_layers(cfg, digits)


def test_rec_lra_run_records_synapse_angles_and_backprop_cosines(digits, tmp_path):
    entries, layers, with_synapse = _alignment("rec_lra", digits, tmp_path)
    assert with_synapse and with_synapse < layers  # the stem sends nothing below the data
    for e in entries:
        assert set(e["synapse_angle_deg"]) == with_synapse
        assert all(0.0 <= v <= 180.0 for v in e["synapse_angle_deg"].values()), e
        assert set(e["backprop_cosine"]) == layers  # the first step is probed already
        assert all(_is_cosine(v) for v in e["backprop_cosine"].values()), e
    cos = [e["backprop_cosine"] for e in entries]
    assert cos[1] == cos[0] and cos[3] == cos[2]  # steps 2, 4 are not probed: the last stays
    assert cos[2] != cos[1]  # step 3 is probed again, with moved weights and another batch


def test_backprop_probe_measures_itself(digits, tmp_path):
    entries, layers, with_synapse = _alignment("backprop", digits, tmp_path)
    assert with_synapse == set()
    for e in entries:
        assert e["synapse_angle_deg"] == {}
        assert set(e["backprop_cosine"]) == layers
        assert all(v == pytest.approx(1.0, abs=1e-6) for v in e["backprop_cosine"].values()), e


def test_no_diagnostics_no_cosines(digits, tmp_path):
    cfg = load_config(None, [*TINY, "train.max_steps=2", "train.log_every=1"])
    assert cfg.train.diagnose_every == 0
    train(cfg, quiet=True, out_dir=tmp_path, splits=digits)
    entries = json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())["alignment"]
    assert [e["step"] for e in entries] == [1, 2]
    assert all(e["backprop_cosine"] == {} and e["synapse_angle_deg"] for e in entries)


# -- a real local Ray ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, namespace="reclra-tests-alignment"
    )
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize(
    "schedule, micro_batches",
    [("sync", 1), ("async", 2)],
    ids=["sync", "async"],
)
def test_two_stage_ray_run_reports_backprop_cosines_of_both_stages(
    cluster, digits, tmp_path, schedule, micro_batches
):
    """rec-LRA `skip` broadcasts e_L, yet with diagnostics stage 0 gets backprop's gradient
    from stage 1; through the controller, into metrics.json."""
    cfg = load_config(
        None,
        [
            *TINY,
            "train.max_steps=3",
            "train.batch_size=16",
            "rule.topology=skip",
            "train.diagnose_every=1",
            "pipeline.stages=2",
            'pipeline.backend="ray"',
            "pipeline.boundaries=[2]",
            f'pipeline.schedule="{schedule}"',
            f"pipeline.micro_batches={micro_batches}",
        ],
    )
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    ctl.run_to_end()
    assert ray.is_initialized()  # the run reused this Ray and left it up
    layers, _ = _layers(cfg, digits)
    stage_layers = [set(ctl.book.stages[s].backprop_cosine) for s in (0, 1)]
    assert all(stage_layers) and not stage_layers[0] & stage_layers[1]
    assert "stem.conv" in stage_layers[0] and "head.fc" in stage_layers[1]
    last = json.loads((tmp_path / "rec_lra" / "metrics.json").read_text())["alignment"][-1]
    assert last["step"] == 3 and set(last["backprop_cosine"]) == layers
    assert all(_is_cosine(v) for v in last["backprop_cosine"].values()), last


@pytest.mark.ray
@pytest.mark.parametrize("micro_batches", [1, 3], ids=["mb1", "mb3"])
def test_three_stage_sync_pipeline_probes_like_one_process(cluster, micro_batches):
    """K = 3 with a broadcast error: only a chained error path brings stage 0 the gradient at
    its own output. The cosines (and the weights) equal one process's."""
    model, shape = ModelConfig(name="resnet8", width=4), (1, 8, 8)
    base = StageSpec(
        model=model,
        rule=RuleConfig(name="rec_lra", topology="skip", feedback_init="kaiming"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.0),
        input_shape=shape,
        num_classes=10,
        blocks=(0, len(model_plan(model, shape, 10))),
        dtype="float64",
        diagnose_every=1,
    )
    local = LocalRunner([base])
    cfg = PipelineConfig(stages=3, micro_batches=micro_batches)
    pipe = RayPipeline(stage_specs(base, [0, 1, 3, 5]), cfg)
    try:
        assert pipe.chained  # forced by diagnostics, though `skip` broadcasts
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            x, y = torch.randn(12, *shape, generator=g), torch.randint(0, 10, (12,), generator=g)
            pipe.step(x, y, micro_batches)
            local.step(x, y, micro_batches)
            expect = local.drain_stats()[0][1].backprop_cosine
            got: dict[str, float] = {}
            stats = pipe.drain_stats(wait=True)
            assert [s for s, _ in stats] == [0, 1, 2]
            for _, st in stats:
                assert st.backprop_cosine, "every stage is probed"
                got.update(st.backprop_cosine)
            assert set(got) == set(expect) and len(expect) == 10
            for name, v in expect.items():
                assert got[name] == pytest.approx(v, abs=1e-9), name
        ours, theirs = pipe.state_dict()["units"], local.state_dict()["units"]
        for name in theirs:  # chaining the error path changed nothing that learns
            for key, t in theirs[name]["tensors"].items():
                torch.testing.assert_close(ours[name]["tensors"][key], t, rtol=1e-12, atol=1e-12)
    finally:
        pipe.close()


def test_a_run_records_the_angles_it_started_from_and_the_mirror_time(digits, tmp_path):
    """metrics.json and /metrics hold E-W angles at the first step (near the weight mirror's
    target with it on, about 90 degrees for KP synapses from zero without it) and the mirror's
    time, which the run's wall time includes."""
    from driver.api.metrics import Metrics

    runs = {}
    for name, sets in (("off", ["rule.mirror_angle=0.0"]), ("on", ["rule.mirror_angle=8.0"])):
        metrics = Metrics()
        cfg = load_config(None, [*TINY, "train.max_steps=2", *sets])
        ctl = Controller(
            cfg,
            out_dir=tmp_path / name,
            splits=digits,
            callbacks=[MetricsCallback(metrics, "rec_lra")],
        )
        ctl.run_to_end()
        written = json.loads((tmp_path / name / "rec_lra" / "metrics.json").read_text())
        scraped = metrics.registry.get_sample_value
        runs[name] = written
        for layer, angle in written["synapse_angle_at_start"].items():
            got = scraped(
                "reclra_layer_synapse_angle_at_start_degrees",
                {"run": "rec_lra", "stage": "0", "layer": layer},
            )
            assert got == pytest.approx(angle), layer
        assert scraped(
            "reclra_stage_mirror_seconds_total", {"run": "rec_lra", "stage": "0"}
        ) == pytest.approx(written["mirror_seconds"])
    _, with_synapse = _layers(load_config(None, TINY), digits)
    assert set(runs["on"]["synapse_angle_at_start"]) == with_synapse
    assert all(a < 14 for a in runs["on"]["synapse_angle_at_start"].values())
    assert all(a > 80 for a in runs["off"]["synapse_angle_at_start"].values())
    assert runs["on"]["mirror_seconds"] > 0 and runs["off"]["mirror_seconds"] == 0
    assert runs["on"]["wall_seconds"] > runs["on"]["mirror_seconds"]
