"""The run's config: every section, TOML files, --set overrides, recipes under what the user
sets; unknown keys fail. Imports nothing above driver/config (a test keeps it so)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cluster.runtime import ClusterConfig
from driver.config.data import DataConfig
from driver.config.metrics import MetricsConfig
from driver.config.pipeline import PipelineConfig
from driver.config.service import ServiceConfig
from driver.config.train import TrainConfig
from workers.models import ModelConfig
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.rules.recipes import label, recipe, split_label


class ConfigError(ValueError):
    """A bad config: one line naming the key and the fix."""


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    # [compare.<rule>.rule] and [compare.<rule>.optim]: a compared rule's own settings, applied
    # over its recipe (with_rule). Only rules listed in train.compare may have a table.
    compare: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # where each value came from: "rule.beta" -> "user" (the file or --set) or "recipe" (the
    # rule's recipe filled a [rule] or [optim] key the user left unset); absent: the default
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        """The checks that span sections (each section checks its own keys)."""
        for name in self.compare:
            if name not in self.train.compare:
                raise ValueError(
                    f"compare.{name}: {name!r} is not in train.compare; add it there or drop "
                    "the table"
                )
        if self.pipeline.transport == "nccl" and self.train.device == "cpu":
            raise ValueError('pipeline.transport: nccl needs train.device = "cuda"; use gloo')
        if self.data.decode == "ray" and (
            self.pipeline.stages == 1 or self.pipeline.backend == "local"
        ):
            raise ValueError(
                'data.decode: "ray" decodes in a Ray actor, but this run has no Ray '
                '(pipeline.stages = 1 or pipeline.backend = "local"); set data.decode = "driver" '
                "or run the stages on Ray"
            )
        if self.pipeline.micro_batches > self.train.batch_size:
            raise ValueError(
                f"pipeline.micro_batches ({self.pipeline.micro_batches}) exceeds "
                f"train.batch_size ({self.train.batch_size})"
            )


SECTIONS: dict[str, type] = {  # the dataclass sections, [model] to [service]
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(Config)
    if f.name not in ("compare", "origin")
}
TUNED = ("rule", "optim")  # the sections a rule's recipe fills


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override, validated."""
    if path is None:
        return parse_config("", overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: no file at {p}; pass an existing TOML file to --config")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeError:
        raise ConfigError(f"config: {p} is not UTF-8 text; save it as UTF-8") from None
    return parse_config(text, overrides, source=str(p))


def parse_config(
    text: str, overrides: list[str] | None = None, *, source: str = "the config"
) -> Config:
    """Like load_config, from TOML text (`source` names it in errors).

    What the user sets wins: the rule's recipe (workers/rules/recipes.py) fills only the
    [rule] and [optim] keys the file and the overrides leave unset, and the Config's `origin`
    says which keys came from where."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    compare: dict[str, dict[str, dict[str, Any]]] = {}
    _check_text(text, f"config: {source}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {source} is not valid TOML ({exc}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"config: {source} nests too deeply to parse; flatten it") from None
    except ValueError:  # an integer past the 4,300 digits Python reads
        raise ConfigError(
            f"config: {source} holds a number too long to read; use a value within its key's bound"
        ) from None
    for section, body in data.items():
        if section == "compare":
            _merge_compare(compare, body, f"[compare] in {source}")
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"config: unknown section [{section}] in {source}; known: {_known_sections()}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"config: [{section}] must be a table in {source}")
        raw[section].update(body)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. rule.beta=0.1")
        value = _parse_value(text.strip(), key.strip())
        if section == "compare":
            path = name.split(".")
            if len(path) != 3:
                raise ConfigError(
                    f"--set {item!r}: expected compare.<rule>.<rule|optim>.<key>=value, "
                    "e.g. compare.backprop.optim.lr=0.001"
                )
            _merge_compare(compare, {path[0]: {path[1]: {path[2]: value}}}, f"--set {item!r}")
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"--set {item!r}: unknown section {section!r}; known: {_known_sections()}"
            )
        raw[section][name] = value
    origin = {f"{sec}.{key}": "user" for sec in SECTIONS for key in raw[sec]}
    if _decoupled_by_default(raw):
        raw["rule"]["preset"] = "decoupled"
        origin["rule.preset"] = "recipe"
    rule = label(str(raw["rule"].get("name", RuleConfig.name)), str(raw["rule"].get("preset", "")))
    for section in TUNED:  # the rule's (or its preset's) own recipe, under what the config sets
        filled = recipe(rule, section)
        origin.update({f"{section}.{k}": "recipe" for k in filled if k not in raw[section]})
        raw[section] = {**filled, **raw[section]}
    try:
        built = {name: _build(name, cls, raw[name]) for name, cls in SECTIONS.items()}
        cfg = Config(**built, compare=compare, origin=origin)
        for name in compare:  # a compared rule's table is checked now, not when it trains
            with_rule(cfg, name)
        return cfg
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OverflowError:  # an integer too large for a float key (float() in _coerce)
        raise ConfigError(
            f"{_huge_key(raw, compare)}: a number too large for a float; use a value within "
            "the key's bound"
        ) from None


def _decoupled_by_default(raw: dict[str, dict[str, Any]]) -> bool:
    """rec-LRA on more than one stage trains decoupled stages (the `decoupled` preset) unless
    the config names a preset or a topology: docs/algorithm.md#decoupled-stages. With one
    stage the two presets train the same weights."""
    stages = raw["pipeline"].get("stages", 1)
    many = stages == "auto" or (
        isinstance(stages, int) and not isinstance(stages, bool) and stages > 1
    )
    rule = raw["rule"]
    return (
        many
        and rule.get("name", RuleConfig.name) == "rec_lra"
        and "preset" not in rule
        and "topology" not in rule
    )


def _known_sections() -> str:
    return ", ".join([*SECTIONS, "compare"])


def _merge_compare(into: dict[str, dict[str, dict[str, Any]]], body: Any, where: str) -> None:
    """Add {rule: {"rule" | "optim": {key: value}}} to `into`, refusing any other shape."""
    if not isinstance(body, dict):
        raise ConfigError(f"config: {where} must be a table of [compare.<rule>] tables")
    for name, tables in body.items():
        if not isinstance(tables, dict):
            raise ConfigError(f"config: compare.{name} in {where} must be a table")
        for section, values in tables.items():
            if section not in TUNED or not isinstance(values, dict):
                raise ConfigError(
                    f"config: compare.{name}.{section} in {where}: a compared rule takes only "
                    "[compare.<rule>.rule] and [compare.<rule>.optim] tables"
                )
            into.setdefault(name, {}).setdefault(section, {}).update(values)


def _check_text(text: str, where: str) -> None:
    """Refuse text that is no UTF-8 (a lone surrogate): no file, log or path could hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        raise ConfigError(
            f"{where} holds a character that is not valid Unicode (line {line}); fix it"
        ) from None


def _huge_key(raw: dict[str, dict[str, Any]], compare: dict[str, Any]) -> str:
    """The first key (section.key) holding an integer past a float's range."""
    tables = [(f"{s}.", v) for s, v in raw.items()]
    tables += [(f"compare.{r}.{s}.", v) for r, t in compare.items() for s, v in t.items()]
    for prefix, values in tables:
        for key, value in values.items():
            try:
                if isinstance(value, int):
                    float(value)
            except OverflowError:
                return prefix + key
    return "config: a key"


def _parse_value(text: str, key: str = "value") -> Any:
    _check_text(f"{key}={text}", "--set")
    where = f"--set {key[:60]}"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as rec_lra
    except RecursionError:
        raise ConfigError(f"{where}: the value nests too deeply to parse; flatten it") from None
    except ValueError:  # an integer past the 4,300 digits Python reads
        raise ConfigError(
            f"{where}: a number too long to read; use a value within the key's bound"
        ) from None


def _build(section: str, cls: type, values: dict[str, Any], *, partial: bool = False) -> Any:
    """`cls` built from `values`, each checked against its field's type; `partial`: only the
    checked values, as keyword arguments (for dataclasses.replace)."""
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"config: unknown key {section}.{key}; known keys: {', '.join(known)}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    if partial:
        return kwargs
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        return tuple(_coerce(key, inner or args[i], v) for i, v in enumerate(value))
    if origin is typing.Literal:
        if value not in typing.get_args(hint) or isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def resolved_line(run: str, config: dict[str, Any], origin: dict[str, str]) -> str:
    """One log line holding a run's resolved config and which keys the user or a recipe set."""
    body = {"config": config, "user": sorted(k for k, v in origin.items() if v == "user")}
    body["recipe"] = sorted(k for k, v in origin.items() if v == "recipe")
    return f"{run}: resolved config {json.dumps(body, sort_keys=True, default=str)}"


def with_rule(cfg: Config, name: str) -> Config:
    """The same run (model, data, epochs, pipeline) with another learning rule or preset (a
    label: `backprop`, `rec_lra_paper`), for side-by-side comparisons: its [rule] is its
    recipe (workers/rules/recipes.py) under its own [compare.<name>.rule] table; its [optim] is
    the run's, with the recipe's keys and then its own [compare.<name>.optim] table on top.
    Nothing of the main rule's [rule] carries over."""
    rule_name, preset = split_label(name)
    own = cfg.compare.get(name, {})
    origin = {k: v for k, v in cfg.origin.items() if not k.startswith("rule.")}
    values: dict[str, dict[str, Any]] = {}
    for section in TUNED:
        filled, mine = recipe(name, section), own.get(section, {})
        origin.update({f"{section}.{k}": "recipe" for k in filled})
        origin.update({f"{section}.{k}": "user" for k in mine})
        values[section] = {**filled, **mine}
    for key, fixed in (("name", rule_name), ("preset", preset)):
        if key in values["rule"] and values["rule"][key] != fixed:
            raise ValueError(f"compare.{name}.rule.{key}: a compared rule's table cannot change it")
    rule = _build(
        f"compare.{name}.rule", RuleConfig, {**values["rule"], "name": rule_name, "preset": preset}
    )
    optim = replace(
        cfg.optim,
        **_build(f"compare.{name}.optim", OptimConfig, values["optim"], partial=True),
    )
    return replace(cfg, rule=rule, optim=optim, origin=origin)
