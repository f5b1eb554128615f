"""`reclra export` and `reclra eval` on small runs trained for a few steps: torchvision's
ResNet-18 loads the export strictly and computes reclra's logits, safetensors round-trips, the
CIFAR form and the MLP load into reclra's plain module, eval's accuracy is the run's own, and a
bad input is one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from driver.cli import main
from driver.config import load_config
from driver.data.load import load_dataset
from driver.pipeline.build import build_runner
from driver.run import checkpoint_store
from driver.run.evaluate import evaluate_trained
from driver.run.export import build_plain, plain_model
from driver.run.train import train

# ResNet-18 in torchvision's form at 32x32 (layer4 on 1x1 maps), a few steps; no weight mirror
# (its noise phase takes minutes on a width-64 ResNet-18 here, and exports nothing)
R18 = [
    'model.name="resnet18"',
    'model.form="imagenet"',
    "model.width=64",
    'data.name="synthetic"',
    "data.synthetic_size=32",
    "rule.mirror_angle=0",
    "train.batch_size=16",
    "train.epochs=1",
    "train.max_steps=2",
    "train.compare=[]",
]
# the CIFAR-form ResNet-8 and a residual tanh MLP without BatchNorm on digits, one epoch
CIFAR = ["model.width=4", "train.epochs=1", "train.batch_size=64", "train.compare=[]"]
MLP = [
    *CIFAR,
    'model.name="mlp"',
    "model.hidden=32",
    "model.depth=4",
    "model.gap=2",
    "model.residual=true",
    'model.act="tanh"',
    "model.batchnorm=false",
]


def _run(tmp_path_factory, name: str, sets: list[str]):
    out = tmp_path_factory.mktemp(name)
    cfg = load_config(None, [*sets, f"train.out_dir={json.dumps(str(out))}"])
    log = train(cfg, quiet=True)
    return cfg, out / cfg.rule.label, log


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return _run(tmp_path_factory, "r18", R18)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return _run(tmp_path_factory, "cifar", CIFAR)


def _reclra_logits(cfg, folder: Path, x: torch.Tensor) -> torch.Tensor:
    """reclra's own eval-mode forward of the run's final checkpoint."""
    state = checkpoint_store.load(folder / "checkpoints")
    runner, _ = build_runner(cfg, load_dataset(cfg.data))
    try:
        runner.load_state_dict(state["runner"])
        return runner.infer(x)
    finally:
        runner.close()


def _test_images(cfg, n: int = 32) -> torch.Tensor:
    test = load_dataset(cfg.data).test
    return torch.stack([test[i][0] for i in range(min(n, len(test)))])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reclra: error:"), err
    return err[0]


def test_resnet18_loads_into_torchvision_strictly_with_reclras_logits(r18, tmp_path):
    cfg, folder, _ = r18
    out = tmp_path / "r18.pt"
    assert main(["export", str(folder), "--format", "torchvision", "--out", str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    assert not [k for k in weights if "feedback" in k or "skip" in k or "aux" in k]
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(weights, strict=True)
    x = _test_images(cfg)
    with torch.no_grad():
        theirs = model.eval()(x)
    ours = _reclra_logits(cfg, folder, x)
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (tmp_path / "r18.toml").is_file()  # the run's config beside it


def test_safetensors_round_trip_with_synapses(r18, tmp_path):
    cfg, folder, _ = r18
    pt, st = tmp_path / "m.pt", tmp_path / "m.safetensors"
    assert main(["export", str(folder), "--format", "state_dict", "--out", str(pt)]) == 0
    args = ["export", str(folder), "--format", "safetensors", "--out", str(st), "--with-synapses"]
    assert main(args) == 0
    plain, tensors = torch.load(pt, weights_only=True), load_file(st)
    extra = {k: v for k, v in tensors.items() if k.startswith("reclra.")}
    assert {k: v for k, v in tensors.items() if k not in extra}.keys() == plain.keys()
    for k, v in plain.items():
        assert torch.equal(tensors[k], v), k
    state = checkpoint_store.load(folder / "checkpoints")
    feedback = state["runner"]["units"]["layer1.0.conv2"]["tensors"]["feedback"]
    assert torch.equal(extra["reclra.layer1.0.conv2.feedback"], feedback)
    assert all(k.endswith((".feedback", ".weight")) for k in extra)
    model = plain_model(cfg, state)
    model.load_state_dict({k: v for k, v in tensors.items() if k not in extra}, strict=True)


@pytest.mark.parametrize("which", ["cifar", "mlp", "bf16"])
def test_the_state_dict_format_loads_into_reclras_plain_module(which, cifar, tmp_path_factory):
    """ResNet-8 in CIFAR form, a residual tanh MLP without BatchNorm, and a train.precision =
    "bf16" run (the plain module runs under the same autocast): reclra's logits, to 1e-5."""
    if which == "cifar":
        cfg, folder, _ = cifar
    else:
        sets = MLP if which == "mlp" else [*CIFAR, 'train.precision="bf16"']
        cfg, folder, _ = _run(tmp_path_factory, which, sets)
    out = folder.parent / "export.pt"
    assert main(["export", str(folder), "--out", str(out)]) == 0  # state_dict: the default
    weights = torch.load(out, weights_only=True)
    net = build_plain(cfg, num_classes=10)
    net.load_state_dict(weights, strict=True)
    leaves = [m for m in net.modules() if not list(m.children())]
    assert leaves and all(type(m).__module__.startswith("torch.nn") for m in leaves)
    x = _test_images(cfg)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), _reclra_logits(cfg, folder, x), rtol=0, atol=1e-5)
    if which != "mlp":
        assert "conv1.weight" in weights and weights["conv1.weight"].shape[-1] == 3  # 3x3 stem
    else:
        assert "dense1.fc1.weight" in weights and "dense0.fc0.bias" in weights


def test_eval_reports_the_runs_own_test_accuracy(cifar, capsys):
    cfg, folder, log = cifar
    assert log.test_acc is not None and log.test_acc > 0.2  # a model that learned something
    assert evaluate_trained(folder).accuracy == log.test_acc
    assert main(["eval", str(folder)]) == 0
    assert f"test acc {log.test_acc:.4f}" in capsys.readouterr().out
    out = folder.parent / "m.safetensors"
    assert (
        main(["export", str(folder / "checkpoints"), "--format", "safetensors", "--out", str(out)])
        == 0
    )
    assert evaluate_trained(out).accuracy == log.test_acc  # its config, from m.toml
    assert evaluate_trained(out, overrides=["data.seed=0"]).samples == 300


def test_bad_inputs_are_one_line_with_exit_2(cifar, tmp_path, capsys):
    _, folder, _ = cifar
    missing = tmp_path / "nope"
    assert main(["export", str(missing)]) == 2
    assert str(missing) in _one_line_error(capsys)
    assert main(["eval", str(missing)]) == 2
    assert str(missing) in _one_line_error(capsys)
    assert main(["export", str(folder), "--format", "onnx"]) == 2
    assert "unknown --format 'onnx'" in _one_line_error(capsys)
    out = tmp_path / "tv.pt"
    assert main(["export", str(folder), "--format", "torchvision", "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert 'model.form = "cifar"' in line and "--format state_dict" in line
    assert not out.exists()
    assert main(["export", str(tmp_path)]) == 2  # a folder without checkpoints
    assert "no checkpoints" in _one_line_error(capsys)
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["eval", str(tmp_path / "notes.txt")]) == 2
    assert "not a reclra checkpoint" in _one_line_error(capsys)
    lone = tmp_path / "lone.pt"
    assert main(["export", str(folder), "--out", str(lone)]) == 0
    (tmp_path / "lone.toml").unlink()
    capsys.readouterr()
    assert main(["eval", str(lone)]) == 2
    assert "--config" in _one_line_error(capsys)
