"""Training runs for the accuracy benchmark, side by side in one-thread worker processes."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from driver.config import Config
from driver.config.data import DataConfig
from driver.data.common import DatasetSplits
from driver.data.load import load_dataset
from driver.run.train import train

_SPLITS: dict[DataConfig, DatasetSplits] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)  # two runs on two cores beat one run on two threads here


def one_run(cfg: Config, track_test: bool = True) -> dict[str, Any]:
    """Train `cfg` to the end; its per-epoch curves (test tracked unless `track_test` is off:
    selection and ablations never look at test) and final test accuracy (None without it)."""
    if cfg.data not in _SPLITS:
        _SPLITS[cfg.data] = load_dataset(cfg.data)
    t0 = time.perf_counter()
    log = train(cfg, quiet=True, splits=_SPLITS[cfg.data], track_test=track_test)
    out = {
        "rule": cfg.rule.label,
        "lr": cfg.optim.lr,
        "seed": cfg.train.seed,
        "test_acc": log.test_acc if track_test else None,
        # decoupled runs on K > 1 stages: each stage's early-exit test accuracy (else None)
        "exit_test_acc": log.exit_test_acc if track_test else None,
        "epochs": log.epochs,
        "seconds": time.perf_counter() - t0,
        "train_seconds": log.step_seconds * log.steps,
        "mirror_seconds": log.mirror_seconds,
        "steps": log.steps,
    }
    shown = f" test {log.test_acc:.4f}" if track_test else ""
    print(
        f"{out['rule']:<13} lr {out['lr']:<7g} seed {out['seed']}: val "
        f"{log.epochs[-1]['val_acc']:.4f}{shown} ({out['seconds']:.0f} s)",
        flush=True,
    )
    return out


def _one_run_untracked(cfg: Config) -> dict[str, Any]:
    return one_run(cfg, track_test=False)


def run_all(cfgs: list[Config], workers: int, *, track_test: bool = True) -> list[dict[str, Any]]:
    """Every run of `cfgs`, in order; `workers` at a time in fresh processes (1: in this one)."""
    fn = one_run if track_test else _one_run_untracked
    if workers <= 1:
        _init_worker()
        return [fn(c) for c in cfgs]
    ctx = mp.get_context("spawn")  # a clean torch per worker, no forked thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        return list(pool.map(fn, cfgs))


def select(runs: dict[str, dict[float, list[dict[str, Any]]]]) -> dict[str, float]:
    """Per rule, the learning rate with the best mean final validation accuracy."""
    return {
        rule: max(
            by_lr, key=lambda lr: statistics.mean(r["epochs"][-1]["val_acc"] for r in by_lr[lr])
        )
        for rule, by_lr in runs.items()
    }
