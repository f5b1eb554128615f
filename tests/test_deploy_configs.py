"""Every example config in deploy/configs loads and builds its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver.config import load_config
from workers.models import model_plan

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "deploy" / "configs").glob("*.toml"))
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "imagenet": ((3, 224, 224), 1000),
    "synthetic": ((3, 32, 32), 10),
}


def test_there_are_example_configs():
    names = {p.stem for p in CONFIGS}
    assert {
        "digits",
        "cifar10_resnet18",
        "imagenet_resnet18",
        "imagenet_resnet34",
        "service",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    shape, classes = SHAPES[cfg.data.name]
    plan = model_plan(cfg.model, shape, classes)
    blocks = [make() for _, make in plan]
    n_params = sum(p.numel() for b in blocks for p in b.parameters())
    assert n_params > 10_000
    assert cfg.pipeline.stages <= len(plan), "more stages than blocks"
    if cfg.model.name == "resnet34" and cfg.model.form == "imagenet":
        assert 21e6 < n_params < 22.5e6  # ResNet-34's 21.8M weights (BN affine included)
