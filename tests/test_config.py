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


def test_recipes_apply_under_what_the_config_sets():
    from workers.rules.recipes import RECIPES

    rec = RECIPES["rec_lra"]
    for key, value in rec["rule"].items():  # the dataclass defaults are rec-LRA's recipe
        assert getattr(Config().rule, key) == value, key
    for key, value in rec["optim"].items():
        assert getattr(Config().optim, key) == value, key
    bp = load_config(None, ["rule.name=backprop"])
    assert (
        bp.rule.input_noise == 0.0 and bp.rule.head_init == RECIPES["backprop"]["rule"]["head_init"]
    )
    assert bp.optim.weight_decay == RECIPES["backprop"]["optim"]["weight_decay"]
    mine = load_config(
        None, ["rule.name=backprop", "optim.weight_decay=0.5", "rule.input_noise=0.2"]
    )
    assert mine.optim.weight_decay == 0.5 and mine.rule.input_noise == 0.2  # the config wins
    assert mine.rule.head_init == "kaiming"


def test_compared_rules_run_their_own_recipe():
    from workers.rules.recipes import RECIPES

    cfg = load_config(None, ["rule.beta=0.3", "optim.schedule=constant", "train.epochs=3"])
    dfa = with_rule(cfg, "dfa")
    assert dfa.rule.name == "dfa" and dfa.rule.beta == 0.1  # rec-LRA's beta does not carry over
    assert dfa.optim.lr == RECIPES["dfa"]["optim"]["lr"]
    assert dfa.optim.schedule == "constant" and dfa.train.epochs == 3 and dfa.model == cfg.model
