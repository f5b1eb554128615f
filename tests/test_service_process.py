"""Each served run trains in a process of its own (driver/api/run_process.py): a run whose
process is killed or crashes is marked failed with the cause while the service and the other
runs go on; a run that will not stop is killed past service.stop_timeout_s; torch globals
(train.threads) stay in the run's process.

Real servers on loopback, real spawned processes, real signals. Every wait has a deadline."""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from driver.api.run_process import HOOKS, Relay, death_cause
from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config.service import ServiceConfig
from driver.run.callbacks import Callback

RUN = """
[model]
width = 4
[train]
epochs = {epochs}
max_steps = {steps}
batch_size = 64
log_every = 1000
threads = {threads}
"""
LONG = RUN.format(epochs=50, steps=0, threads=0)
DEADLINE_S = 120.0
TERMINAL = {"succeeded", "failed", "stopped"}


def _serve(tmp_path: Path, **keys: Any) -> tuple[Service, Client]:
    svc = Service(
        ServiceConfig(port=0, token="t", runs_dir=str(tmp_path), watch_interval_s=0, **keys)
    )
    return svc, Client(f"127.0.0.1:{svc.port}", "t")


def _get(client: Client, run_id: str) -> Any:
    return client.call("GetRun", messages.GetRunRequest(run_id=run_id))


def _start(client: Client, text: str, run_id: str) -> Any:
    return client.call("StartRun", messages.StartRunRequest(config_toml=text, run_id=run_id))


def _until(client: Client, run_id: str, done: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        run = _get(client, run_id)
        if done(run):
            return run
        assert time.monotonic() < deadline, f"{run_id}: {what} never happened ({run})"
        time.sleep(0.1)


def _training(client: Client, run_id: str) -> Any:
    return _until(client, run_id, lambda r: r.step >= 1 and r.pid > 0, "a trained step")


def test_every_callback_hook_is_relayed_from_the_run_process():
    hooks = {n for n, f in vars(Callback).items() if inspect.isfunction(f) and n[0] != "_"}
    assert set(HOOKS) == hooks  # a new hook must cross the process boundary too
    assert all(n in vars(Relay) for n in HOOKS)


def test_death_causes_name_the_signal_and_the_memory_asked_for():
    told = death_cause(-signal.SIGKILL, "~3.0 GiB")
    assert "killed by signal 9 (SIGKILL)" in told and "likely out of memory" in told
    assert "~3.0 GiB" in told
    assert "native library crashed" in death_cause(-signal.SIGSEGV, "~1 GiB")
    assert "exited with code 3" in death_cause(3, "~1 GiB")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_killed_run_fails_with_its_cause_and_the_other_run_finishes(tmp_path, sig):
    svc, client = _serve(tmp_path, max_active_runs=2)
    try:
        _start(client, LONG, "victim")
        _start(client, RUN.format(epochs=1, steps=6, threads=0), "other")
        victim = _training(client, "victim")
        assert victim.pid != os.getpid() and victim.memory_estimate.startswith("~")
        os.kill(victim.pid, sig)
        dead = _until(client, "victim", lambda r: r.state in TERMINAL, "the end")
        assert dead.state == "failed" and dead.pid == 0
        assert f"killed by signal {int(sig)}" in dead.error, dead.error
        if sig == signal.SIGKILL:
            assert f"likely out of memory: the run asked for {victim.memory_estimate}" in dead.error
        written = json.loads((Path(dead.out_dir) / "metrics.json").read_text())
        assert written["state"] == "failed" and written["error"] == dead.error
        # the service goes on: the other run ends as it would have, and new runs start
        events = list(client.watch("other", timeout=DEADLINE_S))
        assert events[-1].run.state == "succeeded" and events[-1].run.step == 6
        assert client.health() == "SERVING"
        again = _start(client, RUN.format(epochs=1, steps=2, threads=0), "after")
        assert again.state in {"pending", "starting", "running"}
        assert list(client.watch("after", timeout=DEADLINE_S))[-1].run.state == "succeeded"
    finally:
        client.close()
        svc.stop()


def test_a_run_that_will_not_stop_is_killed_past_its_deadline(tmp_path):
    svc, client = _serve(tmp_path, stop_timeout_s=2.0)
    try:
        _start(client, LONG, "frozen")
        pid = _training(client, "frozen").pid
        os.kill(pid, signal.SIGSTOP)  # it can no longer checkpoint, or stop by itself
        t0 = time.monotonic()
        client.call("StopRun", messages.StopRunRequest(run_id="frozen"))
        ended = _until(client, "frozen", lambda r: r.state in TERMINAL, "the end")
        assert time.monotonic() - t0 < 30.0
        assert ended.state == "stopped" and "did not stop within its deadline" in ended.error
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone, not left stopped
    finally:
        client.close()
        svc.stop()


def test_train_threads_change_only_the_run_process(tmp_path):
    before = torch.get_num_threads()
    svc, client = _serve(tmp_path)
    try:
        _start(client, RUN.format(epochs=50, steps=0, threads=before + 3), "threads")
        _training(client, "threads")
        assert torch.get_num_threads() == before  # the run set its own process's count
        client.call("StopRun", messages.StopRunRequest(run_id="threads"))
        _until(client, "threads", lambda r: r.state in TERMINAL, "the end")
    finally:
        client.close()
        svc.stop()
    assert torch.get_num_threads() == before


def test_over_budget_and_unfit_requests_are_refused_before_a_process_starts(tmp_path):
    svc, client = _serve(tmp_path, max_run_memory_gib=1.0)
    try:
        # a width that fits the type but not the budget
        with pytest.raises(RpcError) as info:
            _start(client, LONG.replace("width = 4", "width = 2048"), "wide")
        assert info.value.code() == StatusCode.RESOURCE_EXHAUSTED
        assert "GiB" in info.value.details() and "budget of 1.0 GiB" in info.value.details()
        with pytest.raises(RpcError) as info:
            _start(client, LONG + "[pipeline]\nstages = 200\n", "cut")
        assert info.value.code() == StatusCode.INVALID_ARGUMENT
        assert "pipeline.stages" in info.value.details()
        assert client.call("ListRuns", messages.ListRunsRequest()).runs == []
        assert not any(tmp_path.iterdir())  # nothing was written for a refused run
    finally:
        client.close()
        svc.stop()


def test_a_run_that_fits_alone_but_not_beside_the_active_one_waits(tmp_path):
    """Two slots, a budget for one run: the second waits as pending until the first ends."""
    from driver.config import parse_config
    from driver.run.memory import estimate_memory

    one = estimate_memory(parse_config(LONG)).total / 1024**3
    svc, client = _serve(tmp_path, max_active_runs=2, max_run_memory_gib=round(one * 1.5, 2))
    try:
        _start(client, LONG, "first")
        _training(client, "first")
        assert _start(client, RUN.format(epochs=1, steps=2, threads=0), "second").state == (
            "pending"
        )
        time.sleep(2.0)
        assert _get(client, "second").state == "pending"  # a slot is free, the memory is not
        client.call("StopRun", messages.StopRunRequest(run_id="first"))
        events = list(client.watch("second", timeout=DEADLINE_S))
        assert events[-1].run.state == "succeeded" and events[-1].run.step == 2
        assert _get(client, "first").state == "stopped"
    finally:
        client.close()
        svc.stop()
