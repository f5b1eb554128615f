"""A short chaos soak (bench/chaos/soak.py) on a real local Ray cluster: one stage's worker
process is SIGKILLed and the checkpoint location runs out of space once, during one K = 2 sync
run; it ends with the full step count and the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import ray

from bench.chaos.faults import SmallDisk
from bench.chaos.plan import Fault, chaos_config
from bench.chaos.soak import soak
from driver.data.load import load_dataset

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reclra-chaos-smoke")
    yield
    ray.shutdown()


@pytest.mark.parametrize("store", ["tmpfs", "fsspec"])
def test_a_killed_stage_and_a_full_disk_end_as_if_nothing_happened(cluster, tmp_path, store):
    """`tmpfs`: a real filesystem runs out of space (where mounting is allowed); `fsspec`:
    bench.faults' enospc:// refuses the write."""
    if store == "tmpfs" and not SmallDisk.allowed(tmp_path / "probe"):
        pytest.skip("no right to mount a tmpfs here")
    cfg = chaos_config(stages=2, epochs=1, every=3, timeout_s=60.0)
    plan = [Fault("kill", 1, 4), Fault("enospc", -1, 10)]
    result = soak(cfg, load_dataset(cfg.data), plan, tmp_path, store)

    assert result["enospc_method"] == store
    kill, full = result["faults"]
    assert kill["recovered"] and kill["restored_to"] >= 0, kill
    assert 0 <= kill["steps_replayed"] <= 3 and kill["seconds"] > 0
    # one checkpoint write failed for lack of space; training went on, the next one was written
    assert full["recovered"], full
    assert "no space left" in full["note"].lower() and "next good checkpoint" in full["note"]
    assert result["checkpoint_write_failures"] >= 1
    assert result["faults_survived"] == result["faults_injected"] == 2
    assert result["final_state"] == "succeeded", result["error"]
    assert result["steps_lost"] == 0 and result["final_steps"] == result["expected_steps"] == 19
    assert result["last_good_checkpoint"]["ok"]
    assert result["weights_equal"] and result["max_abs_diff"] == 0.0
    assert result["left_alive"] == []  # every killed or stopped worker process is gone
