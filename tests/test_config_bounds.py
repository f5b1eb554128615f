"""Every numeric config key has a bound, declared in its section's dataclass (LIMITS, checked by
workers/bounds.py), and parse_config refuses what lies outside it, NaN and infinities, and odd
input (deep nesting, lone surrogates, huge integers) with a one-line ConfigError."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import pytest

from driver.config import SECTIONS, ConfigError, load_config, parse_config
from workers.bounds import Limits, check_bounds

ROOT = Path(__file__).resolve().parents[1]

# [service] (driver/config/service.py) gets its LIMITS from its owner; until then it is left out
# here, and every test below covers it from the moment its dataclass declares them.
BOUNDED = {s: c for s, c in SECTIONS.items() if s != "service" or hasattr(c, "LIMITS")}

# bounds a section's own check makes open: there the nearest value inside is accepted instead
OPEN = {
    "optim.lr": "low",
    "optim.momentum": "high",
    "optim.beta1": "high",
    "optim.beta2": "high",
    "rule.mirror_angle": "high",
    "rule.mirror_rate": "low",
    "pipeline.cpus_per_stage": "low",
    "pipeline.placement_timeout_s": "low",
    "pipeline.step_timeout_s": "low",
}
# other keys a value at a bound needs, so that only the key under test decides
CONTEXT = {
    "pipeline.micro_batches": ["train.batch_size=65536"],
    "model.gap": ["model.depth=1024"],
    "pipeline.boundaries": ["pipeline.stages=2"],
    "data.train_size": ['data.name="cifar10"'],  # a subset of a held-out set's train file
}


def _numeric(hint: Any) -> set[type]:
    """The number types (int, float) a type hint admits, inside unions and tuples too."""
    if hint in (int, float):
        return {hint}
    return {t for arg in typing.get_args(hint) for t in _numeric(arg)}


def _keys(kind: type | None = None) -> list[tuple[str, str]]:
    """(section, key) of every numeric key (of `kind` only, if given) of every bounded section."""
    return [
        (section, name)
        for section, cls in BOUNDED.items()
        for name, hint in typing.get_type_hints(cls).items()
        if name in {f.name for f in fields(cls)}
        and (_numeric(hint) if kind is None else kind in _numeric(hint))
    ]


def _toml(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _sets(section: str, key: str, value: float) -> list[str]:
    cls = SECTIONS[section]
    hint = typing.get_type_hints(cls)[key]
    text = _toml(value)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        n = 1 if args[-1] is Ellipsis else len(args)
        text = "[" + ", ".join([text] * n) + "]"
    return [*CONTEXT.get(f"{section}.{key}", []), f"{section}.{key}={text}"]


def _refused(sets: list[str], needle: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config("", sets)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    return msg


def test_every_numeric_key_declares_its_bounds():
    assert "service" in SECTIONS and len(BOUNDED) >= len(SECTIONS) - 1
    for section, cls in BOUNDED.items():
        limits = cls.LIMITS  # type: ignore[attr-defined]
        names = {f.name for f in fields(cls)}
        numeric = {key for s, key in _keys() if s == section}
        assert numeric - set(limits) == set(), f"[{section}] keys without bounds"
        assert set(limits) <= names, f"[{section}] LIMITS name no key: {set(limits) - names}"
        for key, (low, high) in limits.items():
            assert math.isfinite(low) and math.isfinite(high) and low < high, (section, key)


@pytest.mark.parametrize("section, key", _keys())
def test_each_bound_is_enforced_and_the_bound_itself_accepted(section, key):
    low, high = SECTIONS[section].LIMITS[key]  # type: ignore[attr-defined]
    name = f"{section}.{key}"
    floats = float in _numeric(typing.get_type_hints(SECTIONS[section])[key])
    for end, bound, outward in (("low", low, -math.inf), ("high", high, math.inf)):
        inside = bound
        if floats:
            inside = float(bound)
            if OPEN.get(name) == end:
                inside = math.nextafter(inside, -outward)
        cfg = parse_config("", _sets(section, key, inside))
        got = getattr(getattr(cfg, section), key)
        assert inside in (got if isinstance(got, tuple) else (got,)), (name, got)
        if floats:
            beyond = math.nextafter(float(bound), outward)
        else:
            beyond = int(bound) + (1 if end == "high" else -1)
        _refused(_sets(section, key, beyond), name)
        if OPEN.get(name) == end:  # the bound itself is refused by the section's own check
            _refused(_sets(section, key, float(bound)), name)


@pytest.mark.parametrize("section, key", _keys(float))
def test_nan_and_infinities_are_refused_for_every_float_key(section, key):
    for text in ("nan", "inf", "-inf"):
        _refused([f"{section}.{key}={text}"], f"{section}.{key}")
    msg = _refused([f"{section}.{key}=nan"], f"{section}.{key}")
    assert "nan" in msg


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["train.epochs=1000000000000"], "train.epochs: 1000000000000 is above the bound 100000;"),
        (["train.batch_size=1000000000"], "train.batch_size: 1000000000 is above the bound"),
        (["model.width=1000000000"], "model.width: 1000000000 is above the bound 4096"),
        (["pipeline.stages=1000"], "pipeline.stages: 1000 is above the bound 256"),
        (["optim.lr=inf"], "optim.lr: inf is not a finite number; set a finite value"),
        (["rule.beta=nan"], "rule.beta: nan is not a finite number"),
        (["optim.lr=1e400"], "optim.lr: inf is not a finite number"),
        (["pipeline.step_timeout_s=1e9"], "pipeline.step_timeout_s: 1000000000 is above"),
        (["data.synthetic_shape=[3, 32, 100000]"], "data.synthetic_shape[2]: 100000 is above"),
        (["pipeline.stages=2", "pipeline.boundaries=[5000]"], "pipeline.boundaries[0]"),
        (["train.seed=-1"], "train.seed: -1 is below the bound 0"),
        (["cluster.num_cpus=10000000"], "cluster.num_cpus: 10000000 is above the bound 65536"),
        (["metrics.port=70000"], "metrics.port"),
    ],
)
def test_the_issues_examples_are_refused_naming_the_key(sets, needle):
    _refused(sets, needle)


def test_auto_stages_are_not_bounded_and_the_same_bounds_hold_in_a_file(tmp_path):
    assert parse_config('[pipeline]\nstages = "auto"\n').pipeline.stages == "auto"
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 100001\n")
    with pytest.raises(ConfigError, match="train.epochs: 100001 is above the bound 100000"):
        load_config(f)
    text = "[train]\ncompare = ['backprop']\n[compare.backprop.optim]\nlr = 1000.0\n"
    with pytest.raises(ConfigError, match="optim.lr: 1000 is above the bound 100;"):
        parse_config(text)  # a compared rule's table is bounded too


DEEP = "[" * 5000 + "]" * 5000
HUGE = str(10**400)


ODD = {  # name: (TOML text, --set overrides, what the message says)
    "deep": (f"v = {DEEP}", [], "nests too deeply to parse; flatten it"),
    "deep_value": (f"[model]\nwidth = {DEEP}", [], "nests too deeply"),
    "deep_set": ("", [f"model.width={DEEP}"], "--set model.width: the value nests too deeply"),
    "surrogate": ('[train]\nout_dir = "\udc80"\n', [], "not valid Unicode (line 2)"),
    "surrogate_key": ('[train]\n"\ud800" = 1\n', [], "not valid Unicode"),
    "surrogate_set": ("", ['train.out_dir="\udc80"'], "--set holds a character that is not"),
    "surrogate_set_key": ("", ["train.\udc80=1"], "not valid Unicode"),
    "nul": ('[train]\nout_dir = "a\x00b"\n', [], "not valid TOML"),
    "escaped_surrogate": ('[data]\nroot = "\\ud800"\n', [], "not valid TOML"),
    "huge_int": (f"[train]\nepochs = {HUGE}\n", [], "train.epochs: an integer of about 401 digits"),
    "huge_float": (f"[optim]\nlr = {HUGE}\n", [], "optim.lr: a number too large for a float"),
    "huge_float_set": ("", [f"optim.lr={HUGE}"], "optim.lr: a number too large for a float"),
    "huge_negative": ("", [f"train.seed=-{HUGE}"], "train.seed: a negative integer of about 401"),
    "huge_compare": (
        f"[train]\ncompare = ['backprop']\n[compare.backprop.optim]\nlr = {HUGE}\n",
        [],
        "compare.backprop.optim.lr: a number too large",
    ),
    "too_long": ("[train]\nepochs = 1" + "0" * 5000 + "\n", [], "a number too long to read"),
    "too_long_set": ("", ["train.epochs=1" + "0" * 5000], "--set train.epochs: a number too long"),
}


@pytest.mark.parametrize("text, sets, needle", list(ODD.values()), ids=list(ODD))
def test_odd_input_is_a_one_line_config_error(text, sets, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(text, sets)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and len(msg) < 300, msg
    msg.encode("utf-8")  # printable as it is


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"[train]\nout_dir = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(f)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "deploy" / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_lies_within_the_bounds(path):
    load_config(path)


def test_the_defaults_lie_within_the_bounds():
    load_config()
    for cls in SECTIONS.values():
        cls()


def test_the_helper_refuses_a_numeric_key_without_a_bound_and_a_bound_on_no_key():
    @dataclass(frozen=True)
    class Section:
        n: int = 3
        x: float = 0.5
        shape: tuple[int, ...] = (2, 2)
        name: str = "a"
        flag: bool = True
        LIMITS: ClassVar[Limits] = {"n": (1, 10), "x": (0.0, 1.0), "shape": (1, 4)}

    check_bounds("s", Section(), Section.LIMITS)
    check_bounds("s", Section(n=10, x=0.0, shape=(1, 4)), Section.LIMITS)
    for kwargs, needle in (
        ({"n": 11}, "s.n: 11 is above the bound 10; use at most 10"),
        ({"n": 0}, "s.n: 0 is below the bound 1; use at least 1"),
        ({"x": math.nan}, "s.x: nan is not a finite number; set a finite value"),
        ({"x": -math.inf}, "s.x: -inf is not a finite number"),
        ({"x": 1.5}, "s.x: 1.5 is above the bound 1; use at most 1"),
        ({"shape": (2, 5)}, "s.shape[1]: 5 is above the bound 4"),
    ):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            check_bounds("s", Section(**kwargs), Section.LIMITS)
    with pytest.raises(LookupError, match="s.x: a numeric key without a bound"):
        check_bounds("s", Section(), {"n": (1, 10), "shape": (1, 4)})
    with pytest.raises(LookupError, match="LIMITS names no key"):
        check_bounds("s", Section(), {**Section.LIMITS, "typo": (0, 1)})
