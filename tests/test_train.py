"""Training end to end in one process: every rule learns digits; the CLI's outputs and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from driver.config import load_config, with_rule
from driver.run.train import train


@pytest.mark.parametrize("rule", ["rec_lra", "lra_e", "dfa", "fa", "kp", "sign", "backprop"])
def test_each_rule_learns_digits(rule, digits, tmp_path):
    cfg = with_rule(load_config(None, ["train.epochs=3", "optim.lr=0.01"]), rule)
    run = train(cfg, quiet=True, out_dir=tmp_path, splits=digits)
    assert run.test_acc is not None and run.test_acc > 0.6, f"{rule}: {run.test_acc}"  # chance: 0.1
    assert len(run.epochs) == 3
    saved = json.loads((tmp_path / rule / "metrics.json").read_text())
    assert saved["test_acc"] == run.test_acc and saved["config"]["rule"]["name"] == rule


def test_rec_lra_topologies_learn(digits, tmp_path):
    for topology in ("mirror", "adjacent"):
        cfg = load_config(None, ["train.epochs=3", "optim.lr=0.01", f"rule.topology={topology}"])
        assert train(cfg, quiet=True, out_dir=tmp_path, splits=digits).test_acc > 0.6, topology


def test_max_steps_and_micro_batches(digits, tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "pipeline.micro_batches=4", "train.epochs=5"])
    run = train(
        replace(cfg, train=replace(cfg.train, compare=())),
        quiet=True,
        out_dir=tmp_path,
        splits=digits,
    )
    assert run.steps == 7 and len(run.epochs) == 1


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "driver.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_cli_trains_and_compares(tmp_path):
    out = tmp_path / "runs"
    p = _cli(
        "train",
        "--quiet",
        "--set",
        "train.epochs=1",
        "--set",
        "train.max_steps=5",
        "--set",
        f"train.out_dir={json.dumps(str(out))}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "rec_lra" in p.stdout and "backprop" in p.stdout and "test acc" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"rec_lra", "backprop"}
    assert (out / "rec_lra" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "rule.betta=1"], "rule.betta"),
        (["--config", "nope.toml"], "no file at"),
        (["--set", "data.name=cifar10", "--set", "data.root=missing"], "missing"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    p = _cli("train", "--quiet", *args, cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reclra: error:") and needle in lines[0], (
        p.stderr
    )
    assert not (tmp_path / "runs").exists()  # nothing written on a refused run


@pytest.mark.ray
def test_train_on_a_two_stage_ray_pipeline(digits, tmp_path):
    """pipeline.stages = 2 trains through Ray actors end to end, balancing the cut by profile."""
    cfg = load_config(
        None,
        [
            "pipeline.stages=2",
            "pipeline.micro_batches=4",
            "train.epochs=2",
            "train.compare=[]",
            "cluster.num_cpus=2",
        ],
    )
    run = train(cfg, quiet=True, out_dir=tmp_path, splits=digits)
    assert run.test_acc > 0.6
    assert (
        len(run.partition) == 3 and run.partition[0] == 0 and run.partition[-1] == 5
    )  # stem, 3 blocks, head
    assert set(run.stages) == {"0", "1"}
    assert all(s["micro_batches"] == 2 * 38 * 4 for s in run.stages.values())
    assert all(s["bytes_received"] > 0 and s["forward_s"] > 0 for s in run.stages.values())
    import ray

    assert not ray.is_initialized()  # the run shut down the local Ray it started
