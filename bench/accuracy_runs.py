"""Training runs for the accuracy benchmark, side by side in one-thread worker processes."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from driver.config import Config
from driver.data.common import DatasetSplits
from driver.data.config import DataConfig
from driver.data.load import load_dataset
from driver.run.train import train

_SPLITS: dict[DataConfig, DatasetSplits] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)  # two runs on two cores beat one run on two threads here


def one_run(cfg: Config) -> dict[str, Any]:
    """Train `cfg` to the end; its per-epoch curves (test tracked) and final test accuracy."""
    if cfg.data not in _SPLITS:
        _SPLITS[cfg.data] = load_dataset(cfg.data)
    t0 = time.perf_counter()
    log = train(cfg, quiet=True, splits=_SPLITS[cfg.data], track_test=True)
    out = {
        "rule": cfg.rule.name,
        "lr": cfg.optim.lr,
        "seed": cfg.train.seed,
        "test_acc": log.test_acc,
        "epochs": log.epochs,
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"{out['rule']:<9} lr {out['lr']:<7g} seed {out['seed']}: val "
        f"{log.epochs[-1]['val_acc']:.4f} test {log.test_acc:.4f} ({out['seconds']:.0f} s)",
        flush=True,
    )
    return out


def run_all(cfgs: list[Config], workers: int) -> list[dict[str, Any]]:
    """Every run of `cfgs`, in order; `workers` at a time in fresh processes (1: in this one)."""
    if workers <= 1:
        _init_worker()
        return [one_run(c) for c in cfgs]
    ctx = mp.get_context("spawn")  # a clean torch per worker, no forked thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        return list(pool.map(one_run, cfgs))


def select(runs: dict[str, dict[float, list[dict[str, Any]]]]) -> dict[str, float]:
    """Per rule, the learning rate with the best mean final validation accuracy."""
    return {
        rule: max(
            by_lr, key=lambda lr: statistics.mean(r["epochs"][-1]["val_acc"] for r in by_lr[lr])
        )
        for rule, by_lr in runs.items()
    }
