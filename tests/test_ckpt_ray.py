"""Checkpoint cuts on a real local Ray cluster: a cut taken as the stream engine's async
stream flows over actors equals the drained state (the p2p engine's cut: tests/test_p2p.py),
and an async run recovers from such a cut after a stage's worker is killed, learning every
micro-batch exactly once."""

from __future__ import annotations

import os
import signal

import pytest
import ray
from ckpt_helpers import CHAINED, CUT
from ckpt_helpers import assert_equal as _assert_equal
from ckpt_helpers import batches as _batches
from ckpt_helpers import stage_states as _stage_states

from driver.config import load_config
from driver.pipeline.build import build_runner
from driver.run import checkpoint_store
from driver.run.controller import Controller, RunState

pytestmark = pytest.mark.ray
BASE = [*CUT, CHAINED]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reclra-ckpt")
    yield
    ray.shutdown()


def _cfg(backend: str, *extra: str):
    return load_config(
        None,
        [
            *BASE,
            f'pipeline.backend="{backend}"',
            "pipeline.stages=2",
            "pipeline.boundaries=[2]",
            *extra,
        ],
    )


def test_a_cut_over_ray_actors_equals_the_drained_state(cluster, digits):
    ray_cfg, local_cfg = _cfg("ray", 'pipeline.engine="stream"'), _cfg("local")
    m = ray_cfg.pipeline.micro_batches
    batches = _batches(ray_cfg, digits, 4)
    remote, local = build_runner(ray_cfg, digits)[0], build_runner(local_cfg, digits)[0]
    try:
        for x, y in batches[:3]:
            remote.step(x, y, m)
            local.step(x, y, m)
        cut = remote.cut()  # type: ignore[union-attr]
        assert not cut.complete  # stage 0 learns micro-batch 11 after it forwards 12
        remote.step(*batches[3], m)
        assert cut.complete
        local.flush()
        _assert_equal(cut.collect(), _stage_states(local))  # type: ignore[arg-type]
    finally:
        remote.close()
        local.close()


def test_an_async_run_recovers_from_a_cut_after_a_stage_is_killed(cluster, digits, tmp_path):
    cfg = _cfg("ray", "train.checkpoint_every=5")
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits, callbacks=[])
    killed = False
    while not ctl.done:
        ctl.step()
        if not killed and ctl.run.steps == 8 and ctl.state is RunState.RUNNING:
            actor = ctl.runner.group.actors[1]  # type: ignore[union-attr]
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed = True
    assert killed and ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.restarts == 1 and ctl.run.steps == 19
    final = checkpoint_store.load(tmp_path / "rec_lra" / "checkpoints")
    # back to step 5's cut and on: the surviving weights learned each of the 19 steps once
    assert final["runner"]["progress"] == pytest.approx(19.0)
