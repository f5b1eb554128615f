"""The gRPC control API: a real server on loopback and a real client, through whole runs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config.service import ServiceConfig, TokenMissing
from driver.run import checkpoint_store

RUN = """
[model]
width = 4
[rule]
beta = 0.15
[optim]
lr = 0.004
[train]
epochs = {epochs}
batch_size = 64
log_every = 1000
"""
TERMINAL = {"succeeded", "failed", "stopped"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(
        ServiceConfig(port=0, token="s3cret", runs_dir=str(tmp_path_factory.mktemp("runs")))
    )
    client = Client(f"127.0.0.1:{svc.port}", "s3cret")
    yield svc, client
    client.close()
    svc.stop()


def _start(client: Client, epochs: int, run_id: str = "") -> str:
    reply = client.call(
        "StartRun", messages.StartRunRequest(config_toml=RUN.format(epochs=epochs), run_id=run_id)
    )
    assert reply.state in {"pending", "starting", "running"}
    return reply.run_id


def test_health_is_serving_without_a_token(service):
    svc, _ = service
    anonymous = Client(f"127.0.0.1:{svc.port}", "wrong")
    try:
        assert anonymous.health() == "SERVING"
    finally:
        anonymous.close()


def test_a_whole_run_watched_to_the_end(service):
    _, client = service
    run_id = _start(client, epochs=1, run_id="whole")
    events = list(client.watch(run_id))
    steps = [e.run.step for e in events]
    assert steps == sorted(steps) and steps[-1] == 19  # progress, in order, to the last step
    assert events[-1].run.state == "succeeded"
    got = client.call("GetRun", messages.GetRunRequest(run_id=run_id))
    assert got.state == "succeeded" and got.total_steps == 19
    written = json.loads((Path(got.out_dir) / "metrics.json").read_text())
    assert got.test_acc == pytest.approx(written["test_acc"]) and 0 < got.test_acc <= 1
    # the request's own settings are what ran; the recipe filled only what it left unset
    assert written["config"]["rule"]["beta"] == 0.15 and written["config"]["optim"]["lr"] == 0.004
    assert written["config_origin"]["optim.lr"] == "user"
    assert written["config_origin"]["optim.weight_decay"] == "recipe"
    listed = client.call("ListRuns", messages.ListRunsRequest())
    assert run_id in {r.run_id for r in listed.runs}


def test_stop_is_graceful_checkpoint_then_stop(service):
    _, client = service
    run_id = _start(client, epochs=50, run_id="long")
    for event in client.watch(run_id):
        if event.run.step >= 3:
            break
    client.call("StopRun", messages.StopRunRequest(run_id=run_id))
    final = list(client.watch(run_id))[-1].run
    assert final.state == "stopped" and final.step < 50 * 19
    saved = checkpoint_store.load(f"{final.out_dir}/checkpoints")
    assert saved["runlog"]["steps"] == final.step  # the stop wrote a checkpoint of where it was


def test_many_concurrent_watchers_all_see_the_end(service):
    _, client = service
    run_id = _start(client, epochs=1, run_id="crowd")
    finals: list[str] = []
    lock = threading.Lock()

    def watch() -> None:
        last = list(client.watch(run_id))[-1].run.state
        with lock:
            finals.append(last)

    threads = [threading.Thread(target=watch) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert finals == ["succeeded"] * 40


def test_bad_token_is_unauthenticated(service):
    svc, _ = service
    intruder = Client(f"127.0.0.1:{svc.port}", "guess")
    try:
        with pytest.raises(RpcError) as info:
            intruder.call("ListRuns", messages.ListRunsRequest())
        assert info.value.code() == StatusCode.UNAUTHENTICATED
        with pytest.raises(RpcError) as info:
            list(intruder.watch("whole"))
        assert info.value.code() == StatusCode.UNAUTHENTICATED
    finally:
        intruder.close()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[rule]\nbetta = 1\n", "rule.betta"),
        ("[rule\n", "not valid TOML"),
        ("[model]\nname = 'vgg'\n", "model.name"),
    ],
)
def test_bad_config_is_invalid_argument_with_the_reason(service, text, needle):
    _, client = service
    with pytest.raises(RpcError) as info:
        client.call("StartRun", messages.StartRunRequest(config_toml=text))
    assert info.value.code() == StatusCode.INVALID_ARGUMENT and needle in info.value.details()


def test_unknown_run_is_not_found(service):
    _, client = service
    with pytest.raises(RpcError) as info:
        client.call("GetRun", messages.GetRunRequest(run_id="nope"))
    assert info.value.code() == StatusCode.NOT_FOUND


def test_service_needs_a_token_and_binds_loopback_by_default(monkeypatch):
    monkeypatch.delenv("RECLRA_TOKEN", raising=False)
    with pytest.raises(TokenMissing, match="RECLRA_TOKEN"):
        Service(ServiceConfig(port=0))
    assert ServiceConfig().addr == "127.0.0.1"
    monkeypatch.setenv("RECLRA_TOKEN", "from-env")
    svc = Service(ServiceConfig(port=0))
    try:
        c = Client(f"127.0.0.1:{svc.port}", "from-env")
        assert c.call("ListRuns", messages.ListRunsRequest()).runs == []
        c.close()
    finally:
        svc.stop()
        time.sleep(0.1)
