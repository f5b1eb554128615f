"""`ray job submit` against a real local Ray head started with token authentication."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_head(monkeypatch, tmp_path):
    """A Ray head on loopback with RAY_AUTH_MODE=token, its token generated the documented way."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = dict(os.environ)
    subprocess.run(
        [RAY, "get-auth-token", "--generate"], env=env, check=True, timeout=60, capture_output=True
    )
    gcs, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
        ],
        env=env,
        check=True,
        timeout=180,
        capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_trains_on_the_cluster(token_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job-runs"
    client = JobSubmissionClient(token_head)
    entry = (
        f"{sys.executable} -m driver.cli train --quiet --set model.width=4 "
        f"--set train.epochs=1 --set train.batch_size=64 --set train.compare=[] "
        f"--set pipeline.stages=2 --set pipeline.boundaries=[2] "
        f"--set 'train.out_dir=\"{out}\"'"  # K > 1: rec-LRA's decoupled stages by default
    )
    job = client.submit_job(
        entrypoint=entry,
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".venv", ".git", "runs", "data", ".whl", "*.pt"],
        },
    )
    deadline = time.monotonic() + 400
    while (status := client.get_job_status(job)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, "job still running after 400 s"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "test acc" in logs
    run = json.loads((out / "rec_lra_decoupled" / "metrics.json").read_text())
    assert run["steps"] == 19 and run["partition"] == [0, 2, 5]


def test_job_submit_with_a_wrong_token_is_refused(token_head):
    """A client that does not hold the cluster's token cannot submit (its own process: Ray
    caches the token it loaded first)."""
    code = (
        "from ray.job_submission import JobSubmissionClient as C; "
        f"C({token_head!r}).submit_job(entrypoint='true')"
    )
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    p = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode != 0
    assert any(w in p.stderr.lower() for w in ("401", "403", "unauthor", "token")), p.stderr[-800:]
