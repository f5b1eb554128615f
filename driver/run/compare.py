"""Train several rules on the same network, data and epochs, and print a side-by-side table."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from driver.config import Config, with_rule
from driver.data.load import load_dataset
from driver.run import storage
from driver.run.callbacks import Callback
from driver.run.run_log import RunLog
from driver.run.train import train
from workers.rules.recipes import computes


def epochs_to(run: RunLog, target: float) -> int | None:
    """The first epoch whose validation accuracy reaches `target`."""
    return next((int(e["epoch"]) for e in run.epochs if e["val_acc"] >= target), None)


def compare_rules(
    cfg: Config,
    *,
    quiet: bool = False,
    progress: bool = False,
    callbacks: Callable[[Config], Sequence[Callback]] | None = None,
) -> list[RunLog]:
    """Train cfg.rule exactly as configured, then every rule in cfg.train.compare with its own
    recipe (and its [compare.<rule>] table: driver/config/root.py:with_rule), on the same
    splits. `callbacks(cfg)` gives each run's observers beside its progress."""
    splits = load_dataset(cfg.data)
    cfgs = [cfg] + [with_rule(cfg, n) for n in cfg.train.compare if n != cfg.rule.label]
    runs = [
        train(
            c,
            quiet=quiet,
            progress=progress,
            splits=splits,
            callbacks=callbacks(c) if callbacks else (),
        )
        for c in cfgs
    ]
    summary_at = storage.join(cfg.train.out_dir, "summary.json")  # a path or URI
    storage.write_bytes(summary_at, json.dumps(summary(runs), indent=1).encode())
    return runs


def summary(runs: list[RunLog]) -> dict:
    ref = next((r for r in runs if r.rule == "backprop"), None)
    target = 0.95 * max(e["val_acc"] for e in ref.epochs) if ref and ref.epochs else None
    return {
        r.rule: {
            "test_acc": r.test_acc,
            "best_val_acc": max(e["val_acc"] for e in r.epochs),
            "epochs_to_95pct_backprop": epochs_to(r, target) if target else None,
            "step_ms": 1e3 * r.step_seconds,
            "mirror_s": r.mirror_seconds,
            "epochs": len(r.epochs),
        }
        for r in runs
    }


def format_table(runs: list[RunLog]) -> str:
    rows = summary(runs)
    head = f"{'rule':<14} {'test acc':>8} {'best val':>8} {'ep->95%bp':>9} {'ms/step':>8}"
    lines = [f"{head} {'mirror s':>8}"]
    for rule, r in rows.items():
        ep = r["epochs_to_95pct_backprop"]
        lines.append(
            f"{rule:<14} {r['test_acc']:>8.4f} {r['best_val_acc']:>8.4f} "
            f"{'-' if ep is None else ep:>9} {r['step_ms']:>8.2f} {r['mirror_s']:>8.2f}"
        )
    lines += ["", "ms/step: training wall time over steps, the weight mirror's time included"]
    lines += ["", *(f"{rule}: {computes(rule)}" for rule in rows if computes(rule))]
    return "\n".join(lines)
