"""Admission: service.max_active_runs at once, a FIFO queue of pending runs up to
service.max_queued, service.keep_finished runs held in memory, service.max_request_bytes.

Real servers on loopback. A long run (50 epochs) holds its slot until it is stopped; every wait
has a deadline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config import ConfigError, parse_config
from driver.config.service import ServiceConfig

RUN = """
[model]
width = 4
[train]
epochs = {epochs}
max_steps = {steps}
batch_size = 64
log_every = 1000
"""
LONG = RUN.format(epochs=50, steps=0)
SHORT = RUN.format(epochs=1, steps=3)
TERMINAL = {"succeeded", "failed", "stopped"}
# states that may hold no slot (an admitted run is pending too while it loads its data)
IDLE = TERMINAL | {"pending"}
DEADLINE_S = 120.0


def _serve(tmp_path: Path, **keys: Any) -> tuple[Service, Client]:
    svc = Service(
        ServiceConfig(port=0, token="t", runs_dir=str(tmp_path), watch_interval_s=0, **keys)
    )
    return svc, Client(f"127.0.0.1:{svc.port}", "t")


def _start(client: Client, text: str, run_id: str) -> str:
    reply = client.call("StartRun", messages.StartRunRequest(config_toml=text, run_id=run_id))
    return str(reply.state)


def _get(client: Client, run_id: str) -> messages.Run:
    return client.call("GetRun", messages.GetRunRequest(run_id=run_id))


def _wait_running(client: Client, run_id: str) -> None:
    """Until the run has trained a step (or fail at the deadline)."""
    stream = client.watch(run_id, timeout=DEADLINE_S)
    try:
        for event in stream:
            assert event.run.state not in TERMINAL, event.run
            if event.run.step >= 1:
                return
    finally:
        stream.cancel()
    raise AssertionError(f"{run_id} ended its stream before training a step")


def _refused(client: Client, text: str, run_id: str) -> RpcError:
    with pytest.raises(RpcError) as info:
        client.call("StartRun", messages.StartRunRequest(config_toml=text, run_id=run_id))
    return info.value


def test_one_at_a_time_fifo_queue_full_and_stopping_a_pending_run(tmp_path):
    svc, client = _serve(tmp_path, max_active_runs=1, max_queued=2)
    try:
        _start(client, LONG, "a")
        _wait_running(client, "a")
        assert _start(client, SHORT, "b") == "pending"
        assert _start(client, SHORT, "c") == "pending"
        refused = _refused(client, SHORT, "d")
        assert refused.code() == StatusCode.RESOURCE_EXHAUSTED
        assert "service.max_queued = 2" in refused.details()

        listed = {
            r.run_id: r.state for r in client.call("ListRuns", messages.ListRunsRequest()).runs
        }
        assert listed["b"] == listed["c"] == "pending" and listed["a"] not in IDLE
        stream = client.watch("b", timeout=DEADLINE_S)
        assert next(stream).run.state == "pending"  # a watcher sees the wait
        stream.cancel()

        stopped = client.call("StopRun", messages.StopRunRequest(run_id="c"))
        assert stopped.state == "stopped"
        assert [e.run.state for e in client.watch("c", timeout=DEADLINE_S)] == ["stopped"]
        assert _start(client, SHORT, "d") == "pending"  # c left the queue: there is room

        client.call("StopRun", messages.StopRunRequest(run_id="a"))
        deadline = time.monotonic() + DEADLINE_S
        while _get(client, "d").state not in TERMINAL:
            assert time.monotonic() < deadline, "the queue did not drain"
            # read the later runs first: a run admitted after another ended is read before it
            sample = {i: _get(client, i).state for i in ("d", "b", "a")}
            assert sum(s not in IDLE for s in sample.values()) <= 1, sample
            if sample["d"] != "pending":
                assert sample["b"] in TERMINAL, sample  # first in, first out
        states = {i: _get(client, i).state for i in "abcd"}
        assert states == {"a": "stopped", "b": "succeeded", "c": "stopped", "d": "succeeded"}
        c = _get(client, "c")
        assert c.step == 0 and not (Path(c.out_dir) / "checkpoints").exists()  # never trained
        assert json.loads((Path(c.out_dir) / "metrics.json").read_text())["steps"] == 0
    finally:
        client.close()
        svc.stop()


def test_two_slots_and_stop_ends_pending_runs_as_stopped(tmp_path):
    svc, client = _serve(tmp_path, max_active_runs=2)
    try:
        for run_id in ("a", "b"):
            _start(client, LONG, run_id)
        for run_id in ("a", "b"):
            _wait_running(client, run_id)  # both train at once
        assert _start(client, LONG, "c") == "pending"
        assert _get(client, "c").state == "pending"
    finally:
        client.close()
        svc.stop()
    held = {h.run_id: h.fields() for h in svc.runs.all()}
    assert {i: f["state"] for i, f in held.items()} == {i: "stopped" for i in "abc"}
    assert held["c"]["step"] == 0 and held["a"]["step"] >= 1
    assert all(f["pid"] == 0 for f in held.values())  # no run's process outlives the service
    ckpts = {i: sorted(Path(f["out_dir"], "checkpoints").glob("ckpt-*")) for i, f in held.items()}
    assert ckpts["c"] == []  # never admitted: an admitted run checkpoints as it starts
    assert ckpts["a"] and ckpts["b"]  # the graceful stop checkpointed
    with pytest.raises(RuntimeError, match="shutting down"):
        svc.runs.start(SHORT, [], "late")  # nothing starts once the service stops


def test_finished_runs_beyond_keep_finished_leave_memory_not_disk(tmp_path):
    svc, client = _serve(tmp_path, keep_finished=1)
    try:
        for run_id in ("x", "y"):
            _start(client, SHORT, run_id)
            assert list(client.watch(run_id, timeout=DEADLINE_S))[-1].run.state == "succeeded"
        with pytest.raises(RpcError) as info:
            _get(client, "x")
        assert info.value.code() == StatusCode.NOT_FOUND
        assert "service.keep_finished = 1" in info.value.details()
        assert f"files stay in {tmp_path / 'x'}" in info.value.details()
        assert (tmp_path / "x" / "rec_lra" / "metrics.json").is_file()
        assert [r.run_id for r in client.call("ListRuns", messages.ListRunsRequest()).runs] == ["y"]
        assert _get(client, "y").state == "succeeded"
        again = _refused(client, SHORT, "x")  # its files are still there: the id stays taken
        assert again.code() == StatusCode.ALREADY_EXISTS
        with pytest.raises(RpcError) as info:
            _get(client, "never")
        assert info.value.code() == StatusCode.NOT_FOUND and "ListRuns" in info.value.details()
    finally:
        client.close()
        svc.stop()


def test_an_oversized_request_is_resource_exhausted(tmp_path):
    svc, client = _serve(tmp_path, max_request_bytes=64 * 1024)
    try:
        padded = "#" + "x" * 40_000 + "\n" + SHORT  # under the limit: accepted
        assert _start(client, padded, "fits") in {"starting", "running", "pending"}
        refused = _refused(client, "#" + "x" * 70_000 + "\n" + SHORT, "big")
        assert refused.code() == StatusCode.RESOURCE_EXHAUSTED
        assert list(client.watch("fits", timeout=DEADLINE_S))[-1].run.state == "succeeded"
        assert not (tmp_path / "big").exists()
    finally:
        client.close()
        svc.stop()
    assert ServiceConfig().max_request_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_active_runs", 0),
        ("max_queued", -1),
        ("keep_finished", -1),
        ("max_request_bytes", 100),
        ("max_request_bytes", 2**31),
        ("runs_dir", "''"),
    ],
)
def test_bad_admission_keys_are_one_line_errors(key, value):
    with pytest.raises(ConfigError) as info:
        parse_config("", [f"service.{key}={value}"])
    message = str(info.value)
    assert message.startswith(f"service.{key}:") and "\n" not in message


def test_admission_defaults():
    cfg = ServiceConfig()
    assert (cfg.max_active_runs, cfg.max_queued, cfg.keep_finished) == (1, 16, 100)
