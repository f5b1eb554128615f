"""The run's config, one package at the bottom of driver/: every driver-owned section
([train], [data], [pipeline], [metrics], [service]), the root Config that gathers them with the
sections workers/ and cluster/ own ([model], [rule], [optim], [cluster]), TOML and --set
parsing, recipes under the user's settings, and each key's one-line doc."""

from driver.config.root import (
    SECTIONS,
    TUNED,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    parse_config,
    resolved_line,
    with_rule,
)
from driver.config.train import TrainConfig

__all__ = [
    "SECTIONS",
    "TUNED",
    "Config",
    "ConfigError",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "resolved_line",
    "with_rule",
]
