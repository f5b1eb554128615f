"""`reclra runs`: the service from the shell, against a real service on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from test_service_tls import pki  # noqa: F401  (a CA, server and client certificates)

from driver.api.service import Service
from driver.cli import main
from driver.config.service import ServiceConfig

TOKEN = "cli-s3cret"
TABLE_HEADER = ("RUN_ID", "STATE", "STEP", "EPOCH", "VAL_ACC", "TEST_ACC", "RESTARTS", "PID")
RUN = """
[model]
width = 4
[train]
epochs = 1
batch_size = 64
log_every = 1000
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    svc = Service(ServiceConfig(port=0, token=TOKEN, runs_dir=runs_dir, max_active_runs=2))
    yield svc
    svc.stop()


@pytest.fixture
def env(service, monkeypatch):
    """The shell's environment: the address and the token, nothing on the command line."""
    monkeypatch.setenv("RECLRA_ADDR", f"127.0.0.1:{service.port}")
    monkeypatch.setenv("RECLRA_TOKEN", TOKEN)
    monkeypatch.delenv("RECLRA_TOKEN_FILE", raising=False)
    for name in ("RECLRA_ROOT_CA", "RECLRA_CERT", "RECLRA_KEY", "RECLRA_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def runs(capsys, *argv: str) -> tuple[int, str, str]:
    """`reclra runs <argv>` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["runs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reclra: error: "), err
    return lines[0]


def _get(capsys, run_id: str) -> dict:
    code, out, err = runs(capsys, "get", run_id, "--json")
    assert code == 0, err
    return json.loads(out)


def _running_pid(capsys, run_id: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = _get(capsys, run_id)
        if run["state"] == "running" and run["pid"] and run["step"] > 0:
            return run["pid"]
        time.sleep(0.1)
    raise AssertionError(f"{run_id} never ran: {run}")


def test_start_list_watch_get_a_whole_run(env, capsys, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(RUN)
    code, out, err = runs(
        capsys, "start", "--config", str(config), "--set", "optim.lr=0.004", "--run-id", "whole"
    )
    assert code == 0, err
    assert out.startswith("whole: ") and "GiB" in out  # the state and the memory estimate
    code, out, _ = runs(capsys, "list")
    header, *rows = out.splitlines()
    assert header.split() == list(TABLE_HEADER)
    assert code == 0 and any(row.split()[0] == "whole" for row in rows)
    code, out, err = runs(capsys, "watch", "whole")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1].startswith("whole: succeeded step 19/19") and "test_acc" in lines[-1]
    run = _get(capsys, "whole")
    assert run["state"] == "succeeded" and run["step"] == run["total_steps"] == 19
    assert 0 < run["test_acc"] <= 1 and run["memory_estimate"].startswith("~")
    written = json.loads((Path(run["out_dir"]) / "metrics.json").read_text())
    assert written["config"]["optim"]["lr"] == 0.004  # the --set reached the run
    code, out, _ = runs(capsys, "get", "whole")
    assert code == 0 and "state:" in out and "succeeded" in out and "19/19" in out


def test_stop_ends_a_run_stopped_and_watch_exits_1_on_a_failed_one(env, capsys):
    """Two long runs side by side: one stopped from the shell, one killed (its pid from get)."""
    for run_id in ("long", "doomed"):
        code, _, err = runs(capsys, "start", "--set", "train.epochs=200", "--run-id", run_id)
        assert code == 0, err
    pid = _running_pid(capsys, "doomed")
    _running_pid(capsys, "long")
    os.kill(pid, signal.SIGKILL)
    code, out, err = runs(capsys, "stop", "long")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("long: stopped")
    assert _get(capsys, "long")["state"] == "stopped"
    code, out, _ = runs(capsys, "watch", "long")  # an ended run: one event, its end state
    assert code == 3 and len(out.splitlines()) == 1
    code, out, _ = runs(capsys, "watch", "doomed")
    assert code == 1
    assert out.splitlines()[-1].startswith("doomed: failed") and "SIGKILL" in out


def test_a_wrong_token_is_one_line_and_exit_2(env, capsys, tmp_path):
    env.setenv("RECLRA_TOKEN", "wrong")
    code, out, err = runs(capsys, "list")
    assert code == 2 and out == ""
    assert "refused the token" in _one_line_error(err)
    # the token from a file (as the service's own token_file), and both set is refused
    env.delenv("RECLRA_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    env.setenv("RECLRA_TOKEN_FILE", str(tmp_path / "token"))
    assert runs(capsys, "list")[0] == 0
    env.setenv("RECLRA_TOKEN", TOKEN)
    code, _, err = runs(capsys, "list")
    assert code == 2 and "unset one of them" in _one_line_error(err)
    env.delenv("RECLRA_TOKEN")
    env.delenv("RECLRA_TOKEN_FILE")
    code, _, err = runs(capsys, "list")
    assert code == 2 and "no bearer token" in _one_line_error(err)


def test_unknown_run_and_bad_requests_are_one_line(env, capsys, tmp_path):
    code, _, err = runs(capsys, "get", "no-such-run")
    assert code == 2 and "NOT_FOUND" in _one_line_error(err) and "no-such-run" in err
    code, _, err = runs(capsys, "watch", "no-such-run")
    assert code == 2 and "NOT_FOUND" in _one_line_error(err)
    code, _, err = runs(capsys, "start", "--set", "train.epochs=-1")
    assert code == 2 and "INVALID_ARGUMENT" in _one_line_error(err) and "train.epochs" in err
    code, _, err = runs(capsys, "start", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "cannot read" in _one_line_error(err)
    code, _, err = runs(capsys, "list", "--cert", str(tmp_path / "c.pem"))
    assert code == 2 and "cert and key go together" in _one_line_error(err)
    code, _, err = runs(capsys, "watch", "whole", "--wait", "0")
    assert code == 2 and "--wait must be a positive number" in _one_line_error(err)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_fails_in_one_line_within_the_deadline(tmp_path):
    """The installed command, in its own process: nothing listens on the port."""
    env = {**os.environ, "RECLRA_TOKEN": TOKEN}
    env.pop("RECLRA_ADDR", None)
    argv = ["runs", "list", "--addr", f"127.0.0.1:{_closed_port()}", "--timeout", "5"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "driver.cli", *argv], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 2 and done.stdout == ""
    assert "cannot reach the service at 127.0.0.1:" in _one_line_error(done.stderr)
    assert took < 30  # interpreter start plus at most the 5 s deadline


def test_a_silent_server_hits_the_deadline(env, capsys):
    """A port that accepts connections and never speaks: the call ends at --timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        code, _, err = runs(
            capsys, "list", "--addr", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1.5"
        )
        took = time.monotonic() - started
    assert code == 2 and took < 10
    line = _one_line_error(err)
    assert "within 1.5 s" in line or "cannot reach" in line


def test_mutual_tls_from_the_environment(env, capsys, tmp_path, pki):  # noqa: F811
    svc = Service(
        ServiceConfig(
            port=0,
            token=TOKEN,
            runs_dir=str(tmp_path),
            tls_cert=pki["server_cert"],
            tls_key=pki["server_key"],
            client_ca=pki["ca"],
        )
    )
    try:
        env.setenv("RECLRA_ADDR", f"localhost:{svc.port}")
        env.setenv("RECLRA_ROOT_CA", pki["ca"])
        code, out, err = runs(capsys, "list", "--timeout", "5")
        assert code == 2 and "cannot reach" in _one_line_error(err)  # no client certificate
        env.setenv("RECLRA_CERT", pki["client_cert"])
        env.setenv("RECLRA_KEY", pki["client_key"])
        code, out, err = runs(capsys, "list", "--timeout", "5")
        assert code == 0 and out.split() == list(TABLE_HEADER), err  # no runs yet
        code, _, err = runs(capsys, "list", "--root-ca", pki["other_ca"], "--timeout", "5")
        assert code == 2 and "cannot reach" in _one_line_error(err)  # a CA that signed nothing
    finally:
        svc.stop()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = [("authorization", f"Bearer {token}")]

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or []), *self.metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def test_reflection_lists_the_service_and_health_with_the_token(service):
    target = f"127.0.0.1:{service.port}"
    with grpc.insecure_channel(target) as raw:
        channel = grpc.intercept_channel(raw, _Bearer(TOKEN))
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"reclra.v1.Training", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        training = pool.FindServiceByName("reclra.v1.Training")
        assert {m.name for m in training.methods} == {
            "StartRun", "GetRun", "ListRuns", "StopRun", "WatchRun"
        }  # fmt: skip
        assert pool.FindMessageTypeByName("reclra.v1.Run").fields_by_name["pid"].number == 11
    with grpc.insecure_channel(target) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(anonymous).get_services()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
