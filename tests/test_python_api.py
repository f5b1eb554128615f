"""The Python API (driver/api/python.py): configs from Python values, a run's Result (its log
and a plain-torch model that classifies as the run did), user callbacks, comparisons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from driver import api
from driver.config import ConfigError, load_config
from driver.run import checkpoint_store

TINY = {
    "model.width": 4,
    "train.epochs": 2,
    "train.max_steps": 12,
    "train.batch_size": 64,
    "train.compare": [],
}


class Epochs(api.Callback):
    """A user's callback: keeps every epoch entry and the states the run went through."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.states: list[str] = []

    def after_epoch(self, ctl: api.RunView, entry: dict[str, Any]) -> None:
        self.entries.append(dict(entry))

    def after_transition(
        self, ctl: api.RunView, previous: api.RunState, current: api.RunState
    ) -> None:
        self.states.append(current.value)


@pytest.fixture(scope="module")
def result(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    seen = Epochs()
    cfg = api.config(values={**TINY, "train.out_dir": str(out)})
    return api.train(cfg, callbacks=[seen], splits=digits, quiet=True), seen, out


def test_a_second_fresh_run_into_the_folder_is_refused_unless_overwrite(result, digits):
    res, _, out = result
    before = {p: p.read_bytes() for p in (out / "rec_lra").rglob("*") if p.is_file()}
    cfg = api.config(values={**TINY, "train.out_dir": str(out)})
    with pytest.raises(api.OldRunError, match="--overwrite"):
        api.train(cfg, splits=digits, quiet=True)
    assert {p: p.read_bytes() for p in (out / "rec_lra").rglob("*") if p.is_file()} == before
    other = out.parent / (out.name + "_overwritten")
    first = api.train(cfg, splits=digits, quiet=True, out_dir=other)
    again = api.train(cfg, splits=digits, quiet=True, out_dir=other, overwrite=True)
    assert again.log.steps == first.log.steps and again.test_acc == first.test_acc


def test_train_returns_the_log_it_wrote(result):
    res, _, out = result
    assert res.rule == "rec_lra" and res.folder == out / "rec_lra"
    saved = json.loads((out / "rec_lra" / "metrics.json").read_text())
    assert json.loads(json.dumps(res.log.__dict__)) == saved
    assert res.test_acc == saved["test_acc"] and res.log.steps == 12
    curves = res.curves()
    assert curves["val_acc"] == [e["val_acc"] for e in saved["epochs"]]
    assert set(curves) >= {"epoch", "train_acc", "train_loss", "val_acc", "val_loss"}


def test_the_model_classifies_the_test_split_as_the_run_did(result, digits):
    res, _, _ = result
    assert isinstance(res.model, torch.nn.Module) and not res.model.training
    assert api.accuracy(res.model, digits.test) == res.test_acc
    assert not any("feedback" in k or k.startswith("aux") for k in res.model.state_dict())


def test_the_model_is_the_final_checkpoint(result):
    res, _, out = result
    newest = checkpoint_store.checkpoints(out / "rec_lra" / "checkpoints")[-1]
    assert res.checkpoint == newest and checkpoint_store.load(newest)["runlog"]["steps"] == 12
    fc = checkpoint_store.load(newest)["runner"]["units"]["head.fc"]["tensors"]["weight"]
    assert torch.equal(res.model.state_dict()["fc.weight"], fc)


def test_user_callbacks_see_the_run(result):
    res, seen, _ = result
    assert seen.entries == res.log.epochs
    assert seen.states[0] == "starting" and seen.states[-1] == "succeeded"


def test_config_from_python_values_is_the_users():
    cfg = api.config(
        values={
            "rule.name": "backprop",
            "optim.lr": 0.02,
            "train.trackers": ["tensorboard"],
            "train.out_dir": "runs/été 🙂",
            "data.synthetic_shape": [1, 8, 8],
        }
    )
    same = load_config(
        None,
        [
            "rule.name=backprop",
            "optim.lr=0.02",
            'train.trackers=["tensorboard"]',
            'train.out_dir="runs/été 🙂"',
            "data.synthetic_shape=[1, 8, 8]",
        ],
    )
    assert cfg == same and cfg.train.out_dir == "runs/été 🙂"
    assert cfg.train.trackers == ("tensorboard",) and cfg.data.synthetic_shape == (1, 8, 8)
    assert cfg.origin["optim.lr"] == "user" and cfg.origin["optim.weight_decay"] == "recipe"
    assert api.config(overrides=["train.epochs=3"], values={"train.epochs": 4}).train.epochs == 4


def test_config_refuses_bad_keys_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="unknown key train.epoch;"):
        api.config(values={"train.epoch": 3})
    with pytest.raises(ConfigError, match="train.trackers: unknown tracker 'wandb'"):
        api.config(values={"train.trackers": ["wandb"]})
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = 2\n")
    assert api.config(path, {"train.seed": 3}).train.epochs == 2


def test_importing_the_api_is_light():
    """`from driver import api` loads neither torch nor the run's code; a name loads them."""
    code = (
        "import sys; from driver import api; print('torch' in sys.modules); "
        "api.train; print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split() == ["False", "True"], out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        api.nope  # noqa: B018


def test_compare_returns_every_rule_with_its_model(digits, tmp_path):
    cfg = api.config(values={**TINY, "train.compare": ["backprop"], "train.out_dir": str(tmp_path)})
    comparison = api.compare(cfg, quiet=True)
    assert list(comparison.results) == ["rec_lra", "backprop"]
    assert comparison["backprop"].config.rule.name == "backprop"
    for rule, res in comparison.results.items():
        assert api.accuracy(res.model, digits.test) == res.test_acc, rule
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(
        json.dumps(comparison.summary())
    )
    assert "backprop" in comparison.table().splitlines()[2]


def test_a_failed_run_raises(tmp_path):
    cfg = api.config(values={**TINY, "data.name": "cifar10", "data.root": str(tmp_path / "none")})
    with pytest.raises(api.RunFailed, match="cifar"):
        api.train(cfg, quiet=True, out_dir=tmp_path)
