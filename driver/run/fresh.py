"""A fresh run never meets an old run's files: `reclra train` into a train.out_dir whose rule
folders (train.out_dir/<rule>, for every rule the command trains) already hold files stops
before writing anything, unless told to replace them (--overwrite) or to continue (--resume).

Without this a second run would mix its curves with the first's checkpoints: its recovery
would go back to the old run's newest checkpoint, and `reclra export` would read the old run.
"""

from __future__ import annotations

import logging

from driver.config import Config, with_rule
from driver.run import storage
from driver.run.storage import Location

log = logging.getLogger(__name__)


class OldRunError(ValueError):
    """train.out_dir holds another run's files: one line naming them and the three ways on."""


def rule_folders(cfg: Config) -> list[Location]:
    """The folders `reclra train` writes: train.out_dir/<rule> for the main rule and every
    compared one."""
    labels = [cfg.rule.label]
    labels += [with_rule(cfg, n).rule.label for n in cfg.train.compare if n != cfg.rule.label]
    return [storage.join(cfg.train.out_dir, label) for label in dict.fromkeys(labels)]


def old_files(cfg: Config) -> dict[Location, list[Location]]:
    """{rule folder: its files} of the folders the run would write that hold any."""
    found = {folder: storage.files_under(folder) for folder in rule_folders(cfg)}
    return {folder: files for folder, files in found.items() if files}


def ensure_fresh(cfg: Config, *, overwrite: bool) -> list[Location]:
    """Before a fresh run writes: raise OldRunError when a rule folder it will write holds
    files; with `overwrite`, remove those folders instead (nothing else under train.out_dir).
    Returns the folders removed."""
    old = old_files(cfg)
    if not old:
        return []
    if overwrite:
        for folder, files in old.items():
            log.warning("--overwrite: removing %s (%d files of an earlier run)", folder, len(files))
            storage.delete_tree(folder)
        return list(old)
    folder, files = next(iter(old.items()))
    count = sum(len(f) for f in old.values())
    example = files[0]
    resume = storage.join(str(folder), "checkpoints")
    raise OldRunError(
        f"train.out_dir {cfg.train.out_dir} already holds another run's files ({count} in "
        f"{', '.join(storage.name(f) for f in old)}, e.g. {example}); continue that run with "
        f"--resume {resume}, write to a new train.out_dir (--set 'train.out_dir=\"...\"'), or "
        "replace them with --overwrite"
    )
