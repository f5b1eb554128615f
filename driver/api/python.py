"""The Python API, for notebooks and scripts: build a config, train it, get back its curves
and its model, compare rules. docs/python.md walks through it.

    from driver import api

    cfg = api.config(values={"train.epochs": 3, "train.trackers": ["tensorboard"]})
    result = api.train(cfg)
    result.log.test_acc, result.curves()["val_acc"], result.model(x)

A run trains exactly as `reclra train` trains it (driver/run/train.py), writes the same files
(train.out_dir/<rule>: metrics.json, checkpoints/, the trackers' tb/ and mlruns/), and raises
RunFailed when it fails; its model is its final checkpoint as plain torch
(driver/run/export.py: plain_model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from driver.config import Config, load_config, with_rule
from driver.config.docs import toml_value
from driver.data.common import DatasetSplits
from driver.data.load import load_dataset, make_loader
from driver.run import checkpoint_store, storage
from driver.run.callbacks import Callback, RunState, RunView
from driver.run.compare import compare_rules, format_table, summary
from driver.run.errors import RunFailed
from driver.run.export import plain_model
from driver.run.fresh import OldRunError, ensure_fresh
from driver.run.run_log import RunLog
from driver.run.storage import Location
from driver.run.train import train as train_run

__all__ = [
    "Callback",
    "Comparison",
    "Config",
    "OldRunError",
    "Result",
    "RunFailed",
    "RunState",
    "RunView",
    "accuracy",
    "compare",
    "config",
    "load_data",
    "train",
    "with_rule",
]


@dataclass
class Result:
    """One trained run: its log, its model and where its files are."""

    config: Config  # what it trained with (a compared rule's: with_rule's)
    log: RunLog  # curves and stats, as metrics.json holds them
    model: nn.Module  # plain torch in eval mode, the final weights: logits as reclra computes
    folder: Location  # train.out_dir/<rule>: metrics.json, checkpoints/, tb/, mlruns/
    checkpoint: Location  # the final checkpoint: resume from it, or `reclra export` it

    @property
    def rule(self) -> str:
        return self.log.rule

    @property
    def test_acc(self) -> float | None:
        return self.log.test_acc

    def curves(self) -> dict[str, list[float]]:
        """The per-epoch curves as columns, one row an epoch (epoch, train_acc, train_loss,
        val_acc, val_loss, seconds, train_seconds; test_acc when tracked): ready for
        pandas.DataFrame or a plot. Lists per epoch (exit_val_acc) are left out."""
        first = self.log.epochs[0] if self.log.epochs else {}
        numeric = [k for k, v in first.items() if isinstance(v, int | float)]
        return {k: [e[k] for e in self.log.epochs] for k in numeric}


@dataclass
class Comparison:
    """Every rule of a comparison, the main rule first (compare)."""

    results: dict[str, Result] = field(default_factory=dict)  # by rule label

    def __getitem__(self, rule: str) -> Result:
        return self.results[rule]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per rule: test_acc, best_val_acc, epochs_to_95pct_backprop, step_ms, mirror_s,
        epochs (what train.out_dir/summary.json holds)."""
        return summary([r.log for r in self.results.values()])

    def table(self) -> str:
        """The closing table `reclra train` prints."""
        return format_table([r.log for r in self.results.values()])


class FinalCheckpoint(Callback):
    """Where a run's checkpoints were published; once it has ended, the last is its final
    state (every run that succeeds writes one at its end)."""

    def __init__(self) -> None:
        self.where: Location | None = None

    def after_checkpoint(self, ctl: RunView, path: Path | str) -> None:
        self.where = path


def config(
    path: str | Path | None = None,
    values: Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
) -> Config:
    """A Config as `reclra train --config path --set ...` builds it: the defaults, the TOML file
    at `path`, then `overrides` ("section.key=value" strings, exactly as --set takes them),
    then `values` ({"section.key": value} with Python values: 3, 0.1, "resnet18",
    ["tensorboard"]). What is set here counts as the user's: a rule's recipe fills only the
    [rule] and [optim] keys left unset. Bad keys or values raise ConfigError (one line)."""
    sets = [*overrides, *(f"{key}={_literal(value)}" for key, value in (values or {}).items())]
    return load_config(path, sets)


def _literal(value: Any) -> str:
    """`value` as the TOML text --set reads back as the same value."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    return toml_value(value)


def load_data(cfg: Config) -> DatasetSplits:
    """cfg.data's train / val / test splits, to pass to several train() calls (loaded once)."""
    return load_dataset(cfg.data)


def train(
    cfg: Config,
    *,
    callbacks: Sequence[Callback] = (),
    splits: DatasetSplits | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    track_test: bool = False,
    quiet: bool = False,
    progress: bool = False,
    overwrite: bool = False,
) -> Result:
    """Train `cfg` to the end and return its Result. `callbacks` observe the run (subclass
    Callback, override the hooks you need); train.trackers adds TensorBoard and MLflow.
    `splits` reuses loaded data (load_data); `out_dir` overrides train.out_dir for this call;
    `resume` continues from a checkpoint (a file, or a run's checkpoints/ folder);
    `track_test` records test accuracy after every epoch too. Progress: a bar on a terminal
    (or with `progress`), log lines elsewhere, nothing with `quiet`. Raises RunFailed when
    the run fails, ConfigError when a tracker's package is missing. A fresh run (no `resume`)
    into a folder holding an earlier run's files raises OldRunError, as `reclra train` does,
    unless `overwrite` removes them first."""
    if resume is None:
        ensure_fresh(_writing_to(cfg, out_dir), overwrite=overwrite)
    final = FinalCheckpoint()
    log = train_run(
        cfg,
        quiet=quiet,
        progress=progress,
        out_dir=out_dir,
        splits=splits,
        track_test=track_test,
        resume=resume,
        callbacks=[*callbacks, final],
    )
    return _result(cfg, log, final, out_dir)


def compare(
    cfg: Config,
    *,
    callbacks: Callable[[Config], Sequence[Callback]] | None = None,
    quiet: bool = False,
    progress: bool = False,
    overwrite: bool = False,
) -> Comparison:
    """Train cfg.rule as configured, then every rule in cfg.train.compare with its own recipe
    (with_rule), on the same data loaded once, as `reclra train` does (summary.json included).
    `callbacks(c)` gives each run's observers from its config. Old files in the rule folders
    raise OldRunError unless `overwrite` removes them (as `reclra train --overwrite`)."""
    ensure_fresh(cfg, overwrite=overwrite)
    finals: dict[str, tuple[Config, FinalCheckpoint]] = {}

    def observers(c: Config) -> list[Callback]:
        finals[c.rule.label] = (c, FinalCheckpoint())
        return [*(callbacks(c) if callbacks else ()), finals[c.rule.label][1]]

    runs = compare_rules(cfg, quiet=quiet, progress=progress, callbacks=observers)
    results = {}
    for run in runs:
        c, final = finals[run.rule]
        results[run.rule] = _result(c, run, final, None)
    return Comparison(results)


def _writing_to(cfg: Config, out_dir: str | Path | None) -> Config:
    """`cfg` as the run writes it: train.out_dir replaced by a call's `out_dir`."""
    if out_dir is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out_dir)))


def _result(cfg: Config, log: RunLog, final: FinalCheckpoint, out_dir: str | Path | None) -> Result:
    if final.where is None:  # a run that succeeded always checkpoints at its end
        raise RunFailed(f"{log.rule}: the run ended without a final checkpoint")
    state = checkpoint_store.load(final.where)
    folder = storage.join(out_dir or cfg.train.out_dir, cfg.rule.label)
    return Result(cfg, log, plain_model(cfg, state), folder, final.where)


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 256) -> float:
    """The fraction of `dataset` (items (x, label), as load_data's splits) `model` classifies
    right, in eval mode."""
    model.eval()
    weight = next(model.parameters())
    correct = seen = 0
    for x, y in make_loader(dataset, batch_size, shuffle=False, seed=0):
        logits = model(x.to(weight.device, weight.dtype))
        correct += int((logits.argmax(1).cpu() == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
