"""What a StartRun request can make the service write: only service.runs_dir/<run_id>.

A real server on loopback and real files: every refused request must leave the whole temporary
tree unchanged (so nothing was written anywhere, inside runs_dir or out of it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fixtures_data import write_idx_mnist

from driver.api.runs import RUN_ID
from driver.api.service import Client, RpcError, Service, StatusCode, messages
from driver.config.service import ServiceConfig

TINY = """
[model]
width = 4
[train]
epochs = 1
max_steps = 2
batch_size = 64
log_every = 1000
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, top of the tmp tree, runs_dir): runs_dir lies three levels down, so "../x"
    and "a/../../b" would land inside the tree this module watches."""
    top = tmp_path_factory.mktemp("tree")
    runs = top / "a" / "b" / "runs"
    runs.mkdir(parents=True)
    svc = Service(ServiceConfig(port=0, token="t", runs_dir=str(runs), watch_interval_s=0))
    client = Client(f"127.0.0.1:{svc.port}", "t")
    yield client, top, runs
    client.close()
    svc.stop()


def _tree(top: Path) -> dict[str, int]:
    """Every path under top (links included, not followed) with its size."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            out[str(p.relative_to(top))] = p.lstat().st_size if p.is_file() else -1
    return out


def _refused(client: Client, code: StatusCode, **fields: object) -> str:
    with pytest.raises(RpcError) as info:
        client.call("StartRun", messages.StartRunRequest(**fields))
    assert info.value.code() == code, info.value.details()
    details: str = info.value.details()
    assert "\n" not in details  # one line
    return details


def _finish(client: Client, run_id: str) -> messages.Run:
    return list(client.watch(run_id, timeout=120))[-1].run


@pytest.mark.parametrize(
    "run_id",
    [
        "../x",
        "a/../../b",
        "a/b",
        "..",
        ".",
        "...",
        ".hidden",
        "-dash",
        "_under",
        "x" * 65,
        "ünïcode",
        "ｒｕｎ",  # fullwidth letters: alphanumeric to str.isalnum, not to the rule
        "a\x00b",
        "abc\n",
        "a b",
        "a\\b",
        "ABSOLUTE",
    ],
)
def test_unsafe_run_ids_are_invalid_argument_and_write_nothing(served, run_id):
    client, top, runs = served
    if run_id == "ABSOLUTE":
        run_id = str(top / "abs")
    before = _tree(top)
    details = _refused(client, StatusCode.INVALID_ARGUMENT, config_toml=TINY, run_id=run_id)
    assert "A-Z a-z 0-9 _ . -" in details and "leave it empty" in details
    assert _tree(top) == before


def test_the_longest_allowed_id_and_a_generated_one_write_under_runs_dir(served):
    client, top, runs = served
    longest = "L" + "x._-9" * 12 + "abc"
    assert len(longest) == 64
    generated = client.call("StartRun", messages.StartRunRequest(config_toml=TINY)).run_id
    assert RUN_ID.fullmatch(generated)
    for run_id in (longest, generated):
        if run_id == longest:
            client.call("StartRun", messages.StartRunRequest(config_toml=TINY, run_id=run_id))
        final = _finish(client, run_id)
        assert final.state == "succeeded", final.error
        assert Path(final.out_dir).resolve().is_relative_to(runs / run_id)
        assert json.loads((Path(final.out_dir) / "metrics.json").read_text())["steps"] == 2
    assert {p.split("/")[0] for p in _tree(top)} == {"a"}  # nothing beside a/b/runs


@pytest.mark.parametrize(
    "toml, overrides, key",
    [
        ("[train]\nout_dir = '{top}/evil'\n", [], "train.out_dir"),
        ("", ["train.out_dir=../../evil"], "train.out_dir"),
        ("", ["train.out_dir={top}/evil"], "train.out_dir"),
        ("[data]\nname = 'mnist'\ndownload = true\nroot = '{top}/evil'\n", [], "data.download"),
        ("[service]\nruns_dir = '{top}/evil'\n", [], "service.runs_dir"),
        ("", ["service.max_active_runs=5"], "service.max_active_runs"),
        (
            "[cluster]\nruntime_env = {{env_vars = {{TMPDIR = '{top}/evil'}}}}\n",
            [],
            "cluster.runtime_env",
        ),
    ],
)
def test_a_request_cannot_point_writes_elsewhere(served, toml, overrides, key):
    client, top, _ = served
    before = _tree(top)
    toml = toml.format(top=top)
    text = TINY.replace("[train]\n", toml) if toml.startswith("[train]") else TINY + toml
    details = _refused(
        client,
        StatusCode.INVALID_ARGUMENT,
        config_toml=text,
        overrides=[o.format(top=top) for o in overrides],
        run_id="pointed",
    )
    assert details.startswith(key) and "drop the key" in details
    assert _tree(top) == before and not (top / "evil").exists()


def test_reading_data_root_elsewhere_is_fine_and_outputs_still_go_to_the_run(served, tmp_path):
    client, _, runs = served
    reply = client.call(
        "StartRun",
        messages.StartRunRequest(
            config_toml=TINY, overrides=[f"data.root={tmp_path}"], run_id="reads"
        ),
    )
    assert _finish(client, reply.run_id).state == "succeeded"
    assert list(tmp_path.iterdir()) == []  # data.root was only read (digits needs no files)
    assert (runs / "reads" / "rec_lra" / "metrics.json").is_file()


def test_a_link_in_runs_dir_is_not_followed(served):
    client, top, runs = served
    outside = top / "outside"
    (runs / "dangling").symlink_to(outside)  # target does not exist yet
    (runs / "existing").symlink_to(top / "a")  # an existing folder outside runs_dir
    (runs / "alias").symlink_to(runs / "another")  # another run's folder, inside runs_dir
    before = _tree(top)
    for run_id in ("dangling", "existing", "alias"):
        details = _refused(client, StatusCode.INVALID_ARGUMENT, config_toml=TINY, run_id=run_id)
        assert "link" in details
    assert _tree(top) == before and not outside.exists()


def test_an_earlier_runs_files_are_never_reused(served):
    client, top, runs = served
    (runs / "old" / "rec_lra" / "checkpoints").mkdir(parents=True)
    marker = runs / "old" / "rec_lra" / "checkpoints" / "ckpt-00000007.pt"
    marker.write_bytes(b"an earlier service's checkpoint")
    before = _tree(top)
    details = _refused(client, StatusCode.ALREADY_EXISTS, config_toml=TINY, run_id="old")
    assert "earlier run's files" in details
    assert _tree(top) == before and marker.read_bytes() == b"an earlier service's checkpoint"


def test_a_relative_runs_dir_is_resolved_once_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    svc = Service(ServiceConfig(port=0, token="t", runs_dir="rel/runs", watch_interval_s=0))
    monkeypatch.chdir("/")  # a later change of directory must not move the runs
    client = Client(f"127.0.0.1:{svc.port}", "t")
    try:
        client.call("StartRun", messages.StartRunRequest(config_toml=TINY, run_id="here"))
        final = _finish(client, "here")
        assert final.state == "succeeded"
        assert Path(final.out_dir) == tmp_path / "rel" / "runs" / "here" / "rec_lra"
    finally:
        client.close()
        svc.stop()


def test_data_roots_bound_what_a_request_may_read(tmp_path):
    """service.data_roots: a data.root outside them (or reached by a link out of them) is
    INVALID_ARGUMENT; under them, a folder without the dataset's files is too (found by name,
    at admission); one holding them is admitted and trains."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    write_idx_mnist(allowed, "FashionMNIST", n_train=96, n_test=16)
    write_idx_mnist(elsewhere, "FashionMNIST", n_train=96, n_test=16)
    (allowed / "empty").mkdir()
    (allowed / "link").symlink_to(elsewhere)
    runs = tmp_path / "runs"
    svc = Service(
        ServiceConfig(
            port=0, token="t", runs_dir=str(runs), watch_interval_s=0, data_roots=(str(allowed),)
        )
    )
    client = Client(f"127.0.0.1:{svc.port}", "t")
    fashion = TINY + "[data]\nname = 'fashion_mnist'\nval_size = 16\n"
    try:
        for root, said in (
            (elsewhere, "outside the folders this service may read"),
            (allowed / "link", "outside the folders this service may read"),
            (Path("/etc"), "outside the folders this service may read"),
            (allowed / "empty", "no FashionMNIST IDX files"),
        ):
            details = _refused(
                client,
                StatusCode.INVALID_ARGUMENT,
                config_toml=fashion,
                overrides=[f"data.root={root}"],
                run_id="r",
            )
            assert details.startswith("data.root:") and said in details, details
        assert not runs.exists() or list(runs.iterdir()) == []
        reply = client.call(
            "StartRun",
            messages.StartRunRequest(
                config_toml=fashion, overrides=[f"data.root={allowed}"], run_id="ok"
            ),
        )
        assert _finish(client, reply.run_id).state == "succeeded"
    finally:
        client.close()
        svc.stop()
