"""What the user sets is what runs: recipes fill only unset [rule] and [optim] keys, for the main
rule and for compared rules, and every run records its resolved config and where each value
came from."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from driver.config import ConfigError, load_config, parse_config, with_rule
from workers.optim import OptimConfig
from workers.rules import RULES, RuleConfig
from workers.rules.recipes import RECIPES, split_label, variants

# A valid value, unlike the default and unlike rec-LRA's recipe, for every key of [rule] and
# [optim]. A new key must be added here: test_every_key_has_a_value_here fails until it is.
USER = {
    "rule": {
        "name": "rec_lra",
        "preset": "mirror",  # the default preset, named
        "topology": "adjacent",
        "feedback_update": "fixed",
        "skip_update": "local",
        "skip_grid": 2,
        "beta": 0.3,
        "gamma": 0.5,
        "mix_skip": 0.19,
        "mix_adjacent": 0.24,
        "reproject": 2.0,
        "input_noise": 0.05,
        "init": "gaussian",
        "init_std": 0.5,
        "feedback_init": "xavier",
        "kp_init": "orthogonal",
        "head_init": "xavier",
        "carry_bn": False,
        "rescale_error": False,
        "mirror_angle": 20.0,
        "mirror_every": 3,
        "mirror_rate": 0.25,
        "aux_head": "linear",
        "aux_recon": 0.5,
    },
    "optim": {
        "name": "sgd",
        "lr": 0.001,
        "weight_decay": 5e-4,
        "momentum": 0.8,
        "beta1": 0.85,
        "beta2": 0.99,
        "schedule": "constant",
        "total_steps": 7,
    },
}
# a second valid value where a recipe happens to hold USER's
OTHER = {"head_init": "zeros", "carry_bn": True, "rescale_error": True, "kp_init": "zeros"}
OTHER |= {"mirror_angle": 7.0, "input_noise": 0.3, "reproject": 3.0, "init_std": 2.0}
OTHER |= {"mix_skip": 0.5, "mix_adjacent": 0.6, "init": "xavier", "feedback_init": "orthogonal"}
OTHER |= {"beta": 0.2, "gamma": 0.7, "topology": "mirror", "feedback_update": "kp"}
RUN = ["train.max_steps=2", "train.compare=[]", "model.width=4", "train.log_every=1"]


def test_every_key_has_a_value_here():
    assert set(USER["rule"]) == {f.name for f in fields(RuleConfig)}
    assert set(USER["optim"]) == {f.name for f in fields(OptimConfig)}
    defaults = {"rule": RuleConfig(), "optim": OptimConfig()}
    for section, values in USER.items():
        for key, value in values.items():
            if key not in ("name", "preset"):  # the default rule and preset, named explicitly
                assert value != getattr(defaults[section], key), f"{section}.{key}"


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _as_sets() -> list[str]:
    return [f"{s}.{k}={_toml(v)}" for s, values in USER.items() for k, v in values.items()]


def _as_file() -> str:
    return "\n".join(
        f"[{s}]\n" + "\n".join(f"{k} = {_toml(v)}" for k, v in values.items())
        for s, values in USER.items()
    )


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "driver.cli", "train", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize("how", ["file", "set"])
def test_every_rule_and_optim_key_reaches_the_trained_run(tmp_path, how):
    """Each key, set in a TOML file or by --set, is what the run trained with: metrics.json
    holds the value and marks it as the user's; the first log line says so too."""
    out = tmp_path / "runs"
    args = [f"--set=train.out_dir={json.dumps(str(out))}", *(f"--set={s}" for s in RUN)]
    if how == "file":
        (tmp_path / "mine.toml").write_text(_as_file())
        args += ["--config", str(tmp_path / "mine.toml")]
    else:
        args += [f"--set={s}" for s in _as_sets()]
    p = _cli(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    written = json.loads((out / "rec_lra" / "metrics.json").read_text())
    for section, values in USER.items():
        for key, value in values.items():
            assert written["config"][section][key] == value, f"{section}.{key}"
            assert written["config_origin"][f"{section}.{key}"] == "user", f"{section}.{key}"
    assert written["steps"] == 2


def test_the_issues_example_writes_exactly_those_values(tmp_path):
    out = tmp_path / "runs"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "driver.cli",
            "train",  # not --quiet: the log lines are checked
            "--set",
            'rule.topology="skip"',
            "--set",
            "rule.beta=0.3",
            "--set",
            "optim.lr=0.001",
            *(f"--set={s}" for s in RUN),
            f"--set=train.out_dir={json.dumps(str(out))}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "rec_lra" / "metrics.json").read_text())["config"]
    assert (cfg["rule"]["topology"], cfg["rule"]["beta"], cfg["optim"]["lr"]) == (
        "skip",
        0.3,
        0.001,
    )
    # the run's first line of its own: the resolved config, with the user's keys named
    line = next(ln for ln in p.stderr.splitlines() if "resolved config" in ln)
    body = json.loads(line.split("resolved config ", 1)[1])
    assert body["config"]["rule"]["topology"] == "skip" and body["config"]["optim"]["lr"] == 0.001
    assert {"rule.topology", "rule.beta", "optim.lr"} <= set(body["user"])
    assert "optim.weight_decay" in body["recipe"]  # the recipe filled what was left unset


@pytest.mark.parametrize("rule", variants(sorted(RULES)))
def test_a_key_the_user_set_is_never_replaced_by_a_recipe(rule):
    """For every rule and preset and every key its recipe sets: the user's other value wins,
    as the main rule and as a compared rule (through its [compare.<rule>] table)."""
    name, preset = split_label(rule)
    for section in ("rule", "optim"):
        for key in RECIPES[rule][section]:
            mine = USER[section][key]
            if mine == RECIPES[rule][section][key]:  # pick another valid value then
                mine = OTHER[key] if section == "rule" else 0.123
            assert mine != RECIPES[rule][section][key], key
            sets = [
                f"rule.name={name}",
                f'rule.preset="{preset}"',
                f"{section}.{key}={_toml(mine)}",
            ]
            cfg = load_config(None, sets)
            assert getattr(getattr(cfg, section), key) == mine, (rule, section, key)
            assert cfg.origin[f"{section}.{key}"] == "user"
            main = load_config(
                None,
                [
                    f"train.compare=[{json.dumps(rule)}]",
                    f"compare.{rule}.{section}.{key}={_toml(mine)}",
                ],
            )
            other = with_rule(main, rule)
            assert getattr(getattr(other, section), key) == mine, (rule, section, key)
            assert other.origin[f"{section}.{key}"] == "user"


def test_recipes_fill_what_is_unset_and_say_so():
    cfg = load_config(None, ["rule.name=backprop", "optim.lr=0.05"])
    assert cfg.optim.lr == 0.05 and cfg.origin["optim.lr"] == "user"
    assert cfg.optim.weight_decay == RECIPES["backprop"]["optim"]["weight_decay"]
    assert cfg.origin["optim.weight_decay"] == "recipe"
    assert "optim.momentum" not in cfg.origin  # the dataclass default


def test_compared_rules_keep_their_recipe_and_take_their_own_table(tmp_path):
    text = """
[rule]
beta = 0.4
[optim]
lr = 0.002
schedule = "constant"
[train]
compare = ["backprop", "dfa"]
[compare.backprop.optim]
lr = 0.0005
[compare.dfa.rule]
input_noise = 0.2
"""
    cfg = parse_config(text)
    assert cfg.rule.beta == 0.4 and cfg.optim.lr == 0.002  # the main rule: as set
    bp, dfa = with_rule(cfg, "backprop"), with_rule(cfg, "dfa")
    assert bp.optim.lr == 0.0005 and bp.origin["optim.lr"] == "user"
    assert bp.optim.weight_decay == RECIPES["backprop"]["optim"]["weight_decay"]
    assert bp.rule.beta == RuleConfig().beta  # the main rule's [rule] does not carry over
    assert bp.optim.schedule == "constant"  # [optim] keys no recipe sets are shared
    assert dfa.rule.input_noise == 0.2 and dfa.optim.lr == RECIPES["dfa"]["optim"]["lr"]


@pytest.mark.parametrize(
    "text, sets, needle",
    [
        ("[compare.fa.optim]\nlr = 0.1", [], "compare.fa: 'fa' is not in train.compare"),
        ("[train]\ncompare = ['fa']\n[compare.fa.optim]\nlrr = 0.1", [], "compare.fa.optim.lrr"),
        ("[train]\ncompare = ['fa']\n[compare.fa.model]\nwidth = 2", [], "compare.fa.model"),
        ("[train]\ncompare = ['fa']\n[compare.fa.optim]\nlr = -1.0", [], "optim.lr"),
        ("", ["train.compare=['fa']", "compare.fa.lr=0.1"], "compare.<rule>.<rule|optim>.<key>"),
        ("", ["train.compare=['fa']", "compare.fa.rule.name=dfa"], "cannot change it"),
    ],
)
def test_bad_compare_tables_are_one_line_errors(text, sets, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(text, sets)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_compare_table_by_set_reaches_the_compared_run(tmp_path):
    out = tmp_path / "runs"
    p = _cli(
        "--set=train.max_steps=2",
        "--set=model.width=4",
        "--set=train.compare=['backprop']",
        "--set=compare.backprop.optim.lr=0.0007",
        "--set=optim.lr=0.002",
        f"--set=train.out_dir={json.dumps(str(out))}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    main = json.loads((out / "rec_lra" / "metrics.json").read_text())
    bp = json.loads((out / "backprop" / "metrics.json").read_text())
    assert main["config"]["optim"]["lr"] == 0.002 and bp["config"]["optim"]["lr"] == 0.0007
    assert bp["config_origin"]["optim.lr"] == "user"
    assert bp["config_origin"]["optim.weight_decay"] == "recipe"


def test_a_preset_is_one_key_away_and_names_its_runs(tmp_path):
    paper = load_config(None, ['rule.preset="paper"', "rule.beta=0.2"])
    assert paper.rule.label == "rec_lra_paper" and paper.rule.topology == "skip"
    assert paper.origin["rule.topology"] == "recipe" and paper.rule.beta == 0.2  # the user's
    assert paper.optim.weight_decay == RECIPES["rec_lra_paper"]["optim"]["weight_decay"]
    assert load_config().rule.label == "rec_lra"
    main = load_config(None, ["train.compare=['rec_lra_paper']", "train.max_steps=1"])
    other = with_rule(main, "rec_lra_paper")
    assert (other.rule.name, other.rule.preset, other.rule.topology) == ("rec_lra", "paper", "skip")
    with pytest.raises(ConfigError, match="rule.preset: backprop has no preset 'paper'"):
        load_config(None, ["rule.name=backprop", 'rule.preset="paper"'])
    with pytest.raises(ConfigError, match="train.compare: unknown rule 'rec_lra_nope'"):
        load_config(None, ["train.compare=['rec_lra_nope']"])
