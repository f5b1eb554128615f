"""Fault tolerance on a real local Ray cluster: a stage's worker process is killed mid-run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from pathlib import Path

import pytest
import ray
import torch
from ckpt_helpers import CHAINED, TINY
from prometheus_client import generate_latest

from driver.api.metrics import Metrics
from driver.api.metrics_callback import MetricsCallback
from driver.config import load_config
from driver.data.common import TensorImages
from driver.run import checkpoint_store
from driver.run.controller import Controller, RunFailed, RunState
from driver.run.train import train

pytestmark = pytest.mark.ray

BASE = [*TINY, "train.checkpoint_every=5", "pipeline.micro_batches=2", CHAINED]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reclra-recovery")
    yield
    ray.shutdown()


def _kill_worker(actor) -> int:  # noqa: ANN001
    """SIGKILL the process behind a Ray actor (what a lost node or the OOM killer does)."""
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)
    return pid


def _final_units(out: Path) -> dict:
    (ckpts,) = out.glob("*/checkpoints")  # one rule's folder: rec_lra or rec_lra_decoupled
    return checkpoint_store.load(ckpts)["runner"]["units"]


@pytest.mark.parametrize(
    "stages, bounds, victim, rule",
    [
        (2, "[2]", 1, CHAINED),
        (3, "[1, 3]", 0, CHAINED),
        (3, "[1, 3]", 1, 'rule.topology="decoupled"'),  # auxiliary heads restored too
    ],
    ids=["chained-k2", "chained-k3", "decoupled-k3"],
)
def test_killed_stage_is_recreated_and_the_run_ends_as_if_nothing_happened(
    cluster, digits, tmp_path, stages, bounds, victim, rule
):
    extra = [f"pipeline.stages={stages}", f"pipeline.boundaries={bounds}", rule]
    cfg = load_config(None, [*BASE, *extra])
    ref = train(cfg, quiet=True, out_dir=tmp_path / "ref", splits=digits)

    metrics = Metrics()
    ctl = Controller(
        cfg,
        out_dir=tmp_path / "hit",
        splits=digits,
        run_id="hit",
        callbacks=[MetricsCallback(metrics, "hit")],
    )
    seen: list[RunState] = []
    killed = False
    while not ctl.done:
        seen.append(ctl.step())
        if not killed and ctl.run.steps == 8 and ctl.state is RunState.RUNNING:
            _kill_worker(ctl.runner.group.actors[victim])  # type: ignore[union-attr]
            killed = True
    assert killed and ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.restarts == 1 and RunState.RECOVERING in seen
    assert ctl.run.steps == ref.steps == 19  # the full number of steps
    assert ctl.run.restarts == 1
    exported = generate_latest(metrics.registry).decode()
    assert 'reclra_restarts_total{run="hit"} 1.0' in exported  # counted in the metrics
    # recovery went back to step 5 and replayed the same data: the same final weights
    a, b = _final_units(tmp_path / "ref"), _final_units(tmp_path / "hit")
    for name in a:
        for key, t in a[name]["tensors"].items():
            torch.testing.assert_close(b[name]["tensors"][key], t, rtol=1e-12, atol=1e-12)


def test_without_restarts_a_lost_stage_fails_the_run_naming_it(cluster, digits, tmp_path):
    cfg = load_config(
        None, [*BASE, "pipeline.stages=2", "pipeline.boundaries=[2]", "train.max_restarts=0"]
    )
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    while not ctl.done:
        ctl.step()
        if ctl.run.steps == 3 and ctl.state is RunState.RUNNING and ctl.runner is not None:
            _kill_worker(ctl.runner.group.actors[1])  # type: ignore[attr-defined]
    assert ctl.state is RunState.FAILED
    assert "stage 1" in ctl.error and "train.max_restarts" in ctl.error  # type: ignore[operator]


def test_non_finite_update_fails_the_run_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    # NaN inputs (optim.lr is bounded at 100 now, so a huge learning rate can no longer make the
    # run diverge)
    cfg = load_config(None, [*BASE, "rule.reproject=0.0", 'optim.name="sgd"'])
    n = len(digits.train)
    x = torch.full_like(torch.stack([digits.train[i][0] for i in range(n)]), float("nan"))
    y = torch.tensor([int(digits.train[i][1]) for i in range(n)])
    huge = dataclasses.replace(digits, train=TensorImages(x, y))
    with pytest.raises(RunFailed, match=r"stage 0: non-finite .* at step \d+") as info:
        train(cfg, quiet=True, out_dir=tmp_path, splits=huge)
    assert "\n" not in str(info.value)
    good = checkpoint_store.checkpoints(tmp_path / "rec_lra" / "checkpoints")
    assert good, "the last good checkpoint is kept"
    checkpoint_store.load(good[-1])  # and it verifies


def test_a_hung_stage_times_out_and_is_recreated(cluster, digits, tmp_path):
    """SIGSTOP a stage's worker (it hangs, it does not die): the step's deadline fires, the run
    names the stage, recreates the stages from the last checkpoint, and finishes."""
    cfg = load_config(
        None, [*BASE, "pipeline.stages=2", "pipeline.boundaries=[2]", "pipeline.step_timeout_s=8"]
    )
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    stopped = None
    try:
        while not ctl.done:
            ctl.step()
            if stopped is None and ctl.run.steps == 6 and ctl.state is RunState.RUNNING:
                actor = ctl.runner.group.actors[1]  # type: ignore[union-attr]
                stopped = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
                os.kill(stopped, signal.SIGSTOP)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)  # let a leftover process die normally
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.restarts == 1 and ctl.run.steps == 19
    assert "stage 1" in (ctl.error or "") and "pipeline.step_timeout_s" in (ctl.error or "")


def test_a_start_that_fails_before_any_checkpoint_is_retried_up_to_max_restarts(
    cluster, digits, tmp_path
):
    """Actors that cannot start in time (a deadline far too short) are lost before the first
    checkpoint exists: nothing was trained, so the run starts them again, counting restarts,
    and fails only when no restarts are left, saying so."""
    cfg = load_config(
        None,
        [*BASE, "pipeline.stages=2", "pipeline.boundaries=[2]", "train.max_restarts=2"]
        + ["pipeline.placement_timeout_s=0.001"],
    )
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits, callbacks=[])
    with pytest.raises(RunFailed, match=r"no restarts left \(train.max_restarts = 2\)"):
        ctl.run_to_end()
    assert ctl.restarts == 2
    assert ctl.run.steps == 0
    assert not checkpoint_store.checkpoints(tmp_path / "rec_lra" / "checkpoints")
