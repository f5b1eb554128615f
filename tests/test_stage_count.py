"""Choosing the stage count: the step-time model, `pipeline.stages = "auto"`, the warning."""

from __future__ import annotations

import logging

import pytest

from driver.config import ConfigError, load_config
from driver.data.load import load_dataset
from driver.pipeline.build import build_runner
from driver.pipeline.stage_count import CALL_SECONDS, choose, predict, warn_if_slower
from workers.chain import LocalRunner

COSTS = [0.010, 0.010, 0.010, 0.010]  # seconds per micro-batch, per block
HOPS = [0.001, 0.001, 0.001]


def _predict(k: int, *, cores: float = 8, sync: bool = False, single: float = 0.040):
    return predict(k, COSTS, HOPS, micro_batches=4, cores=cores, sync=sync, single_seconds=single)


def test_one_process_is_the_measured_whole_model():
    p = _predict(1, single=0.030)
    assert p.step_seconds == pytest.approx(4 * 0.030) and p.bounds == (0, 4)


def test_the_slowest_stage_sets_the_pace_with_its_calls_and_hop():
    p = _predict(2)
    assert p.bounds == (0, 2, 4)
    stage1 = 0.020 + CALL_SECONDS + 0.001  # one call (forward + learn), the hop in
    stage0 = 0.020 + 2 * CALL_SECONDS
    assert p.step_seconds == pytest.approx(4 * max(stage0, stage1))


def test_sync_pays_the_bubble():
    assert _predict(2, sync=True).step_seconds == pytest.approx(
        _predict(2).step_seconds * (4 + 1) / 4
    )


def test_fewer_cores_than_stages_share_the_work():
    shared = _predict(4, cores=2)
    assert "2 cores shared by 4 stages" in shared.why
    assert shared.step_seconds > _predict(4, cores=8).step_seconds


def test_choose_takes_the_fastest_and_logs_every_prediction(caplog):
    preds = [_predict(k, single=0.040) for k in (1, 2, 4)]
    with caplog.at_level(logging.INFO):
        best = choose(preds)
    assert best.k == 4  # 4 x (10 ms + calls) beats 40 ms in one process on 8 cores
    assert all(f"K={k}:" in caplog.text for k in (1, 2, 4))


def test_warn_when_the_asked_k_is_slower_than_one_process(caplog):
    slow, single = _predict(2, single=0.005), _predict(1, single=0.005)
    with caplog.at_level(logging.WARNING):
        warn_if_slower(slow, single)
    assert "predicted slower than one process" in caplog.text and "K=1:" in caplog.text
    caplog.clear()
    warn_if_slower(single, single)
    assert caplog.text == ""


@pytest.mark.parametrize("value", ["0", "-1", '"many"', "true"])
def test_stages_must_be_a_positive_integer_or_auto(value):
    with pytest.raises(ConfigError, match="pipeline.stages"):
        load_config(None, [f"pipeline.stages={value}"])


def test_auto_trains_a_small_model_in_one_process(caplog, monkeypatch):
    """When a micro-batch's work costs less than the stream engine's calls for it, the
    prediction keeps the run in this process, and says why. The block costs are measured for
    real; the calls are set to cost 20 ms each (a busy cluster's), because on the digits
    ResNet the measured work and this machine's ~1 ms calls are close enough that load alone
    tips the choice either way."""
    from driver.pipeline import stage_count

    monkeypatch.setattr(stage_count, "CALL_SECONDS", 0.02)
    monkeypatch.setattr(stage_count, "DRIVER_CALL_SECONDS", 0.02)
    cfg = load_config(
        None,
        ['pipeline.stages="auto"', "pipeline.micro_batches=4", 'pipeline.engine="stream"'],
    )
    splits = load_dataset(cfg.data)
    with caplog.at_level(logging.INFO):
        runner, part = build_runner(cfg, splits)
    try:
        assert isinstance(runner, LocalRunner) and len(part.bounds) == 2
        assert "pipeline.stages = auto: K=1" in caplog.text and "K=2:" in caplog.text
    finally:
        runner.close()


def test_a_stream_whose_driver_cannot_keep_up_is_driver_bound():
    """Short stage work (1 ms a block): the stream's driver makes 2K - 1 calls per micro-batch
    at DRIVER_CALL_SECONDS each and sets the pace; the p2p engine makes K calls a step, so its
    stages do, each paying its two ops' messages instead of calls."""
    from driver.pipeline.stage_count import (
        DRIVER_CALL_SECONDS,
        P2P_OP_SECONDS,
        calls_per_micro_batch,
    )

    costs, m = [0.001] * 4, 8
    kw = dict(micro_batches=m, cores=64, sync=False, single_seconds=0.004)
    stream = predict(4, costs, [0.0] * 3, **kw)
    assert "driver-bound" in stream.why
    per_mb = DRIVER_CALL_SECONDS * calls_per_micro_batch(4, m, sync=False)
    assert per_mb == pytest.approx(DRIVER_CALL_SECONDS * (7 + 4 / m))
    assert stream.step_seconds == pytest.approx(m * per_mb)
    p2p = predict(4, costs, [0.0] * 3, engine="p2p", **kw)
    assert "driver-bound" not in p2p.why
    assert p2p.step_seconds == pytest.approx(m * (0.001 + 2 * P2P_OP_SECONDS))
