"""Run outputs at a path or URI without a network: file:// and memory:// URIs, the enospc://
filesystem (bench/faults.py) that fails writes like a full disk, bad locations refused before
anything is written, and where a run on a Ray cluster says its outputs went."""

from __future__ import annotations

import hashlib
import json
import logging
import socket

import pytest
import torch

import bench.faults as faults
from driver.cli import main
from driver.config import ConfigError, load_config
from driver.run import checkpoint_store, storage
from driver.run.checkpoint_store import CheckpointError
from driver.run.train import train

TINY = ["model.width=4", "train.epochs=1", "train.max_steps=3", "train.compare=[]"]


def test_locations_keep_local_paths_as_paths():
    assert storage.location("runs/x") == storage.location("file://runs/x")
    assert storage.join("file:///tmp/a", "b") == storage.location("/tmp/a/b")
    assert storage.join("s3://bucket/runs/", "rec_lra", "checkpoints") == (
        "s3://bucket/runs/rec_lra/checkpoints"
    )
    assert not storage.is_remote(storage.location("/tmp/x"))


def test_a_file_uri_writes_the_same_bytes_as_a_path(tmp_path):
    state = {"x": torch.arange(4.0)}
    a = checkpoint_store.save(tmp_path / "a", 2, state)
    b = checkpoint_store.save(f"file://{tmp_path}/b", 2, state)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt-00000002.pt"]


def test_memory_uri_publishes_with_a_marker_and_prunes_after(tmp_path):
    where = "memory://storage-test/ckpts"
    for step in range(1, 5):
        checkpoint_store.save(where, step, {"s": torch.tensor(step)}, keep=2)
    fs, root = storage.filesystem(where)
    assert sorted(fs.ls(root, detail=False)) == [
        f"{root}/ckpt-0000000{s}.{e}" for s in (3, 4) for e in ("json", "pt")
    ]
    assert json.loads(fs.cat_file(f"{root}/ckpt-00000004.json"))["step"] == 4
    assert int(checkpoint_store.load(where)["s"]) == 4


def test_enospc_fails_fast_in_one_line_and_keeps_the_last_good(caplog):
    where = "enospc://full/ckpts"
    faults.FullFileSystem.reset(clear=True)
    checkpoint_store.save(where, 1, {"s": torch.tensor(1)})
    faults.FullFileSystem.fail_next(1, match="ckpt-00000002")
    caplog.set_level(logging.WARNING)
    with pytest.raises(CheckpointError) as info:
        checkpoint_store.save(where, 2, {"s": torch.tensor(2)})
    msg = str(info.value)
    assert "\n" not in msg and f"{where}/ckpt-00000002.pt" in msg
    assert "No space left on device" in msg and "free space there" in msg
    assert faults.FullFileSystem.refused == ["/full/ckpts/ckpt-00000002.pt"]  # no retries
    assert "retry" not in caplog.text
    assert int(checkpoint_store.load(where)["s"]) == 1
    checkpoint_store.save(where, 2, {"s": torch.tensor(2)})  # space again: it goes on
    assert int(checkpoint_store.load(where)["s"]) == 2


def test_a_run_out_of_space_fails_with_the_location(digits):
    faults.FullFileSystem.reset(clear=True)
    faults.FullFileSystem.fail_next(-1, match="/checkpoints/")
    cfg = load_config(None, [*TINY, 'train.out_dir="enospc://run"'])
    try:
        with pytest.raises(Exception) as info:
            train(cfg, quiet=True, splits=digits)
    finally:
        faults.FullFileSystem.reset()
    assert "No space left on device" in str(info.value) and "enospc://run/rec_lra" in str(
        info.value
    )


def test_unknown_protocols_are_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.out_dir: storage: unknown protocol s4://"):
        load_config(None, ['train.out_dir="s4://bucket/runs"'])
    code = main(["train", "--resume", "s4://bucket/x.pt", "--set", f'train.out_dir="{tmp_path}"'])
    assert code == 2 and "unknown protocol s4://" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_relative_out_dir_on_a_ray_cluster_is_logged_with_host(
    digits, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never dialled: one stage runs in process
    caplog.set_level(logging.WARNING, logger="driver.run.train")
    train(load_config(None, [*TINY, 'train.out_dir="runs/rel"']), quiet=True, splits=digits)
    lines = [r.getMessage() for r in caplog.records]
    where = f"{tmp_path.resolve()}/runs/rel/rec_lra on host {socket.gethostname()}"
    assert [m.split(" outputs ")[1].split(",")[0] for m in lines] == [
        f"go to {where}",
        f"are in {where}",
    ]
    caplog.clear()
    train(load_config(None, [*TINY, f'train.out_dir="{tmp_path}/abs"']), quiet=True, splits=digits)
    assert not caplog.records
