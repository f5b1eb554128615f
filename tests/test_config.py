"""Config loading: TOML sections, --set overrides with types, and one-line errors naming the key."""

from __future__ import annotations

import pytest

from driver.config import Config, ConfigError, config_to_dict, load_config, with_rule


def test_defaults_are_the_digits_demo():
    cfg = load_config()
    assert (cfg.data.name, cfg.model.name, cfg.rule.name) == ("digits", "resnet8", "rec_lra")
    assert "backprop" in cfg.train.compare


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[rule]\nname = "lra_e"\nbeta = 0.3\n[train]\nepochs = 3\ncompare = ["fa"]\n'
        '[data]\nsynthetic_shape = [1, 4, 4]\nname = "synthetic"\n'
    )
    cfg = load_config(f, ["rule.beta=0.5", "train.epochs=7", "optim.lr=1", "rule.topology=mirror"])
    assert cfg.rule.name == "lra_e" and cfg.rule.beta == 0.5 and cfg.rule.topology == "mirror"
    assert cfg.train.epochs == 7 and cfg.train.compare == ("fa",)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.synthetic_shape == (1, 4, 4)
    assert config_to_dict(cfg)["rule"]["beta"] == 0.5


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("[rule]\nbetta = 1\n", [], "rule.betta"),
        ("[rulez]\n", [], "[rulez]"),
        ("", ["rule.beta=abc"], "rule.beta: expected float"),
        ("", ["train.epochs=1.5"], "train.epochs: expected int"),
        ("", ["rule.name=sgd"], "rule.name"),
        ("", ["rule.topology=ring"], "rule.topology"),
        ("", ["model.name=vgg"], "model.name"),
        ("", ["pipeline.micro_batches=64", "train.batch_size=32"], "pipeline.micro_batches"),
        ("", ["beta=1"], "section.key=value"),
        ("", ["optim.lr=-1"], "optim.lr"),
        ("", ["train.compare=['nope']"], "train.compare"),
        ("[rule\n", [], "not valid TOML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_missing_file():
    with pytest.raises(ConfigError, match="no file at"):
        load_config("/no/such/file.toml")


def test_with_rule_changes_only_the_rule():
    cfg = Config()
    other = with_rule(cfg, "dfa")
    assert (
        other.rule.name == "dfa" and other.rule.beta == cfg.rule.beta and other.model == cfg.model
    )
