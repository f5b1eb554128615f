"""Checkpoints in a real S3-compatible server (moto's, on 127.0.0.1) through s3fs, with a small
HTTP proxy in front (also on 127.0.0.1) that injects what a real store does: 503s, stalls, a
client killed mid-upload. Nothing leaves the loopback: the endpoint comes from
AWS_ENDPOINT_URL, credentials are dummies, the metadata service is off."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from ckpt_helpers import TINY  # noqa: E402

from driver.config import load_config  # noqa: E402
from driver.run import checkpoint_store, storage  # noqa: E402
from driver.run.checkpoint_store import CheckpointError  # noqa: E402
from driver.run.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = [*TINY, "train.epochs=2", "train.checkpoint_every=7"]  # the tiny digits run


class Rule:
    """What the proxy does to the next `times` requests of `method` whose path has `needle`:
    answer `status` (with an S3 error `code`), or read half the body and hold (`hold`)."""

    def __init__(self, method, needle, *, times=1, status=503, code="ServiceUnavailable", hold=0):
        self.method, self.needle, self.times = method, needle, times
        self.status, self.code, self.hold = status, code, hold
        self.held, self.release = threading.Event(), threading.Event()


class Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.rules, self.seen = upstream, [], []
        self.lock = threading.Lock()

    def match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if rule.times and rule.method == method and rule.needle in path:
                    rule.times -= 1
                    return rule
        return None

    def count(self, method: str, needle: str) -> int:
        return sum(m == method and needle in p for m, p in self.seen)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _any(self) -> None:
        rule = self.server.match(self.command, self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if rule is not None and rule.hold:
            self.rfile.read(length // 2)  # mid-upload: half the body in, the rest pending
            rule.held.set()
            rule.release.wait(rule.hold)
            self.close_connection = True
            return  # never forwarded: the store never sees this object
        body = self.rfile.read(length)
        if rule is not None:
            xml = f"<Error><Code>{rule.code}</Code><Message>injected</Message></Error>".encode()
            self.send_response(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            self.wfile.write(xml)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
        conn.request(self.command, self.path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and the proxy in front of it, both on 127.0.0.1; the bucket `runs`."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = Proxy(server.get_host_and_port())
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs, _ = storage.filesystem("s3://runs")
    fs.mkdir("runs")
    try:
        yield proxy, env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proxy.shutdown()
        server.stop()


def _units(where) -> dict:
    return checkpoint_store.load(where)["runner"]["units"]


def test_killed_run_resumes_from_s3_with_the_same_weights(s3, digits, tmp_path):
    """A CLI run writing to s3:// is SIGKILLed while uploading its step-14 checkpoint; resumed
    from the s3:// prefix (step 7), it ends with the weights of an uninterrupted run."""
    proxy, env = s3
    rule = Rule("PUT", "/killed/rec_lra/checkpoints/ckpt-00000014.pt", hold=120)
    proxy.rules.append(rule)
    sets = [*BASE, 'train.out_dir="s3://runs/killed"']
    cmd = [sys.executable, "-m", "driver.cli", "train", "--quiet"]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env})
    try:
        assert rule.held.wait(240), "the run never began uploading its step-14 checkpoint"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        rule.release.set()
        proc.kill()
    ckpts = "s3://runs/killed/rec_lra/checkpoints"
    assert [storage.name(p) for p in checkpoint_store.checkpoints(ckpts)] == [
        "ckpt-00000000.pt",
        "ckpt-00000007.pt",
    ]
    ref = train(load_config(None, BASE), quiet=True, out_dir=tmp_path, splits=digits)
    resumed = train(
        load_config(None, BASE),
        quiet=True,
        out_dir="s3://runs/resumed",
        splits=digits,
        resume=ckpts,
    )
    assert resumed.steps == ref.steps == 38
    assert resumed.test_acc == pytest.approx(ref.test_acc, abs=1e-12)
    a = _units(tmp_path / "rec_lra" / "checkpoints")
    b = _units("s3://runs/resumed/rec_lra/checkpoints")
    for name in a:
        for key, t in a[name]["tensors"].items():
            torch.testing.assert_close(b[name]["tensors"][key], t, rtol=0, atol=0)
    written = json.loads(storage.read_bytes("s3://runs/resumed/rec_lra/metrics.json"))
    assert written["steps"] == 38 and len(written["epochs"]) == 2


def test_transient_errors_and_a_stall_are_retried_and_logged(s3, caplog, monkeypatch):
    proxy, _ = s3
    monkeypatch.setenv("RECLRA_STORAGE_DEADLINE_S", "2")
    proxy.rules.append(Rule("PUT", "/transient/ckpt-00000003.pt", times=2))
    stall = Rule("PUT", "/transient/ckpt-00000003.json", hold=6)
    proxy.rules.append(stall)
    caplog.set_level(logging.WARNING, logger="driver.run.storage")
    state = {"x": torch.arange(5.0)}
    t0 = time.perf_counter()
    checkpoint_store.save("s3://runs/transient", 3, state)
    took = time.perf_counter() - t0
    stall.release.set()
    assert proxy.count("PUT", "/transient/ckpt-00000003.pt") == 3
    assert proxy.count("PUT", "/transient/ckpt-00000003.json") == 2
    lines = [r.getMessage() for r in caplog.records]
    assert sum("write s3://runs/transient/ckpt-00000003.pt failed" in m for m in lines) == 2
    assert any("ckpt-00000003.json failed (TimeoutError: no answer within 2 s)" in m for m in lines)
    assert all("retry" in m for m in lines) and took < 20
    torch.testing.assert_close(checkpoint_store.load("s3://runs/transient")["x"], state["x"])


@pytest.mark.parametrize(
    "status, code, needle, fix",
    [
        (403, "AccessDenied", "injected", "grant write access"),
        (404, "NoSuchBucket", "injected", "create the bucket"),
    ],
)
def test_permanent_errors_fail_at_once_in_one_line(s3, status, code, needle, fix):
    proxy, _ = s3
    where = f"s3://runs/denied-{status}"
    proxy.rules.append(Rule("PUT", f"/denied-{status}/ckpt-00000001.pt", status=status, code=code))
    with pytest.raises(CheckpointError) as info:
        checkpoint_store.save(where, 1, {"x": torch.zeros(1)})
    msg = str(info.value)
    assert "\n" not in msg and f"{where}/ckpt-00000001.pt" in msg and needle in msg and fix in msg
    assert proxy.count("PUT", f"/denied-{status}/ckpt-00000001.pt") == 1  # no retries
    assert checkpoint_store.checkpoints(where) == []


def test_partial_uploads_are_ignored_and_load_returns_the_last_good(s3, caplog):
    where = "s3://runs/partial"
    for step in (1, 2):
        checkpoint_store.save(where, step, {"step": torch.tensor(step)}, keep=0)
    fs, root = storage.filesystem(where)
    good = fs.cat_file(f"{root}/ckpt-00000002.pt")
    fs.pipe_file(f"{root}/ckpt-00000003.pt", good)  # complete object, marker never written
    fs.pipe_file(f"{root}/ckpt-00000004.pt", good[:-20])  # truncated, with a forged marker
    fs.pipe_file(f"{root}/ckpt-00000004.json", json.dumps({"sha256": "x"}).encode())
    caplog.set_level(logging.WARNING, logger="driver.run.checkpoint_store")
    assert [storage.name(p)[5:13] for p in checkpoint_store.checkpoints(where)] == [
        "00000001",
        "00000002",
        "00000004",
    ]
    assert int(checkpoint_store.load(where)["step"]) == 2
    text = caplog.text
    assert "ckpt-00000003.pt: no marker" in text and "ckpt-00000004.pt is truncated" in text
    with pytest.raises(CheckpointError, match="no marker ckpt-00000003.json"):
        checkpoint_store.load(f"{where}/ckpt-00000003.pt")
    checkpoint_store.save(where, 5, {"step": torch.tensor(5)}, keep=2)  # retention, then cleanup
    assert sorted(fs.ls(root, detail=False)) == [
        f"{root}/ckpt-0000000{s}.{e}" for s in (4, 5) for e in ("json", "pt")
    ]
