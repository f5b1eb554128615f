"""Every config key documents itself, and `reclra config` prints the resolved config as TOML a
run can read back, each key with where its value came from."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib

from driver.config import SECTIONS, load_config, parse_config
from driver.config.docs import describe, field_docs


def test_every_key_of_every_section_has_a_docstring():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section}] keys without a docstring: {missing}"


def test_choices_are_literal_types_and_refused_in_one_line():
    cfg = load_config()
    assert cfg.optim.name == "adamw"
    for bad, needle in (
        ("optim.schedule=linear", "optim.schedule: 'linear' is not one of"),
        ("pipeline.engine=fast", "pipeline.engine: 'fast' is not one of"),
        ("model.name=vgg", "model.name: 'vgg' is not one of"),
        ('data.name="svhn"', "data.name: 'svhn' is not one of"),
    ):
        try:
            load_config(None, [bad])
        except ValueError as exc:
            assert needle in str(exc) and "\n" not in str(exc), exc
        else:
            raise AssertionError(f"{bad} was accepted")


def test_cross_section_checks_live_in_the_config():
    for sets, needle in (
        (['pipeline.transport="nccl"'], "nccl needs train.device"),
        (['pipeline.engine="p2p"', 'pipeline.backend="local"'], "runs its stages as Ray actors"),
        (['pipeline.stages="auto"', 'pipeline.backend="local"'], '"auto" needs the Ray backend'),
    ):
        try:
            load_config(None, sets)
        except ValueError as exc:
            assert needle in str(exc), exc
        else:
            raise AssertionError(f"{sets} was accepted")


def test_the_printed_config_reads_back_as_the_same_config_and_says_where_values_came_from():
    sets = ["rule.beta=0.3", 'rule.preset="paper"', "train.epochs=2", "model.width=8"]
    cfg = load_config(None, sets)
    text = describe(cfg)
    again = parse_config(text)
    for section in SECTIONS:
        assert getattr(again, section) == getattr(cfg, section), section
    lines = {ln.split("=", 1)[0].strip(): ln for ln in text.splitlines() if " = " in ln}
    assert "# user " in lines["beta"] and "# recipe " in lines["topology"]
    assert "# default " in lines["momentum"] and "The target's step" in lines["beta"]
    assert tomllib.loads(text)["rule"]["topology"] == "skip"


def test_reclra_config_prints_it(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "driver.cli", "config", "--set", "optim.lr=0.002"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert tomllib.loads(p.stdout)["optim"]["lr"] == 0.002 and "# user" in p.stdout
    assert not any(tmp_path.iterdir())  # it only prints
