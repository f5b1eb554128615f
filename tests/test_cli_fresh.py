"""A fresh `reclra train` never meets an old run's files: refused (exit 2, one line, nothing
touched), replaced with --overwrite, continued with --resume; paths and URIs alike."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from driver.cli import main
from driver.run import checkpoint_store, storage

# digits, a tiny ResNet-8, three steps, the main rule only
TINY = ["model.width=4", "train.epochs=1", "train.max_steps=3", "train.compare=[]"]


def _train(out: str | Path, *extra: str, sets: tuple[str, ...] = ()) -> int:
    args = ["train", "--quiet", *extra]
    for s in [*TINY, *sets, f"train.out_dir={json.dumps(str(out))}"]:
        args += ["--set", s]
    return main(args)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reclra: error:"), err
    return err[0]


def test_a_second_run_into_the_same_folder_is_refused_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert _train(out) == 0
    before = _hashes(out)
    assert "rec_lra/metrics.json" in before and any("ckpt-" in f for f in before)
    capsys.readouterr()
    assert _train(out, sets=("train.seed=1",)) == 2
    line = _one_line_error(capsys)
    assert "already holds another run's files" in line and str(out) in line
    for way in ("--resume", str(out / "rec_lra" / "checkpoints"), "train.out_dir", "--overwrite"):
        assert way in line, way
    assert _hashes(out) == before  # byte for byte, and no file added


def test_a_compared_rules_folder_counts_too(tmp_path, capsys):
    """Old files in the folder of any rule the command trains (here the compared backprop)."""
    out = tmp_path / "runs"
    assert _train(out, sets=('rule.name="backprop"',)) == 0
    before = _hashes(out)
    capsys.readouterr()
    assert _train(out, sets=('train.compare=["backprop"]',)) == 2
    assert "backprop" in _one_line_error(capsys)
    assert _hashes(out) == before and not (out / "rec_lra").exists()


def test_overwrite_replaces_only_the_rule_folders_the_run_writes(tmp_path):
    out = tmp_path / "runs"
    assert _train(out) == 0
    (out / "notes.txt").write_text("mine")
    (out / "fa").mkdir()
    (out / "fa" / "metrics.json").write_text("{}")
    (out / "rec_lra" / "checkpoints" / "ckpt-00000099.pt").write_bytes(b"an old run's")
    assert _train(out, "--overwrite", sets=("train.seed=1",)) == 0
    written = json.loads((out / "rec_lra" / "metrics.json").read_text())
    assert written["config"]["train"]["seed"] == 1
    ckpts = checkpoint_store.checkpoints(out / "rec_lra" / "checkpoints")
    assert ckpts and "ckpt-00000099.pt" not in [p.name for p in ckpts]
    for path in ckpts:  # every checkpoint there is the new run's
        assert checkpoint_store.load(path)["config"]["train"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # outside the rule folders: kept
    assert (out / "fa" / "metrics.json").read_text() == "{}"


def test_resume_continues_the_run(tmp_path):
    out = tmp_path / "runs"
    assert _train(out) == 0
    ckpts = str(out / "rec_lra" / "checkpoints")
    assert _train(out, "--resume", ckpts, sets=("train.max_steps=5",)) == 0
    written = json.loads((out / "rec_lra" / "metrics.json").read_text())
    assert written["steps"] == 5
    assert checkpoint_store.load(ckpts)["runlog"]["steps"] == 5


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    out = tmp_path / "runs"
    assert _train(out, "--resume", str(out), "--overwrite") == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("scheme", ["memory"])
def test_a_uri_out_dir_is_checked_and_overwritten_the_same_way(scheme, capsys):
    out = f"{scheme}://fresh-{uuid.uuid4().hex[:8]}/runs"
    metrics = storage.join(out, "rec_lra", "metrics.json")
    assert _train(out) == 0
    first = storage.read_bytes(metrics)
    files = storage.files_under(storage.join(out, "rec_lra"))
    assert len(files) >= 2
    capsys.readouterr()
    assert _train(out, sets=("train.seed=1",)) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert storage.read_bytes(metrics) == first
    assert storage.files_under(storage.join(out, "rec_lra")) == files
    assert _train(out, "--overwrite", sets=("train.seed=1",)) == 0
    assert json.loads(storage.read_bytes(metrics))["config"]["train"]["seed"] == 1
