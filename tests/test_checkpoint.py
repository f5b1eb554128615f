"""Checkpoints: exact resume (also on another stage count), and refusal of bad files."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ckpt_helpers import TINY

from driver.config import load_config
from driver.run import checkpoint_store
from driver.run.checkpoint_store import CheckpointError
from driver.run.train import train

BASE = [*TINY, "train.epochs=2"]  # the tiny float64 digits run, two epochs


def _units(path):
    return checkpoint_store.load(path)["runner"]["units"]


def _assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key, t in a[name]["tensors"].items():
            torch.testing.assert_close(
                b[name]["tensors"][key], t, rtol=tol, atol=tol, msg=f"{name}.{key}"
            )


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = load_config(None, [*BASE, "train.checkpoint_every=7"])
    run = train(cfg, quiet=True, out_dir=out, splits=digits)
    return out / "rec_lra" / "checkpoints", run


def test_checkpoints_written_every_n_steps_and_at_the_end(uninterrupted):
    ckpts, run = uninterrupted
    steps = [int(p.name[5:13]) for p in checkpoint_store.checkpoints(ckpts)]
    # step 0: written at the start so that a lost stage can always be recovered
    assert run.steps == 2 * 19 and steps == [0, 7, 14, 21, 28, 35, 38]
    state = checkpoint_store.load(ckpts / "ckpt-00000007.pt")
    assert state["position"] == {"epoch": 0, "batch": 7}
    assert state["config"]["model"]["width"] == 4
    units = state["runner"]["units"]  # keyed by layer name, error synapses with their layer
    assert {"weight", "feedback", "bn.running_mean"} <= set(units["layer2.0.conv2"]["tensors"])


@pytest.mark.parametrize(
    "extra, tol",
    [
        ([], 0.0),
        (
            [
                "pipeline.stages=2",
                'rule.topology="mirror"',  # the chained rule: K stages train one process's
                'pipeline.backend="local"',
                "pipeline.boundaries=[2]",
            ],
            1e-10,
        ),
    ],
)
def test_resumed_run_ends_with_the_same_weights(uninterrupted, digits, tmp_path, extra, tol):
    """Resume mid-epoch from step 7 (also on two stages): the final weights equal those of the
    uninterrupted run."""
    ckpts, run = uninterrupted
    cfg = load_config(None, [*BASE, *extra])
    resumed = train(
        cfg, quiet=True, out_dir=tmp_path, splits=digits, resume=ckpts / "ckpt-00000007.pt"
    )
    assert resumed.steps == run.steps and len(resumed.epochs) == 2
    assert resumed.test_acc == pytest.approx(run.test_acc, abs=1e-12)
    _assert_same(
        _units(ckpts / "ckpt-00000038.pt"),
        _units(tmp_path / "rec_lra" / "checkpoints" / "ckpt-00000038.pt"),
        tol,
    )


def _digest(directory) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in checkpoint_store.checkpoints(directory)
    }


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda b: b[:-100], "truncated"),
        (lambda b: b[:-50] + bytes([b[-50] ^ 0xFF]) + b[-49:], "checksum"),
        (lambda b: b"PK" + b[2:], "not a reclra checkpoint"),
    ],
)
def test_damaged_checkpoints_are_refused_and_nothing_is_overwritten(
    uninterrupted, tmp_path, digits, damage, needle
):
    ckpts, _ = uninterrupted
    bad = tmp_path / "ckpt-00000007.pt"
    bad.write_bytes(damage((ckpts / "ckpt-00000007.pt").read_bytes()))
    before = _digest(ckpts)
    with pytest.raises(CheckpointError, match=needle) as info:
        train(
            load_config(None, BASE), quiet=True, out_dir=tmp_path / "out", splits=digits, resume=bad
        )
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    assert _digest(ckpts) == before
    assert not (tmp_path / "out").exists()  # the refused run wrote nothing


def test_mismatched_checkpoint_names_the_keys(uninterrupted, digits, tmp_path):
    ckpts, _ = uninterrupted
    cfg = load_config(None, [*BASE, "model.width=8", 'rule.topology="mirror"'])
    with pytest.raises(CheckpointError, match=r"\[model\] \(model\.width\)"):
        train(cfg, quiet=True, out_dir=tmp_path, splits=digits, resume=ckpts)


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in range(1, 6):
        checkpoint_store.save(tmp_path, step, {"x": torch.zeros(1)}, keep=2)
    assert [p.name for p in checkpoint_store.checkpoints(tmp_path)] == [
        "ckpt-00000004.pt",
        "ckpt-00000005.pt",
    ]
    assert checkpoint_store.load(tmp_path)["x"].shape == (1,)  # a directory loads its newest
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no ckpt"):
        checkpoint_store.load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no file at"):
        checkpoint_store.load(tmp_path / "missing.pt")
