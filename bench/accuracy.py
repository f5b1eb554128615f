"""Benchmark: every rule on the same network, data and epochs (digits), several seeds, side by side.

    python -m bench.accuracy --json results.json [--epochs 10 --seeds 0,1,2 --lrs 1e-3,3e-3,1e-2]

For each rule the learning rate is chosen on the validation split (mean over seeds of the final
validation accuracy), then the test accuracy of that choice is reported. Step-time ratios are
timed in one process, rules interleaved round-robin so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from driver.config import Config, load_config, with_rule
from driver.data import load_dataset, make_loader
from driver.train import base_spec, train
from workers.runner import LocalRunner

RULES = ("rec_lra", "backprop", "lra_e", "dfa", "fa")


def _cfg(base: Config, rule: str, lr: float, seed: int, epochs: int, out: str) -> Config:
    cfg = with_rule(base, rule)
    return replace(
        cfg,
        optim=replace(cfg.optim, lr=lr),
        train=replace(cfg.train, seed=seed, epochs=epochs, out_dir=out, compare=()),
    )


def step_times(
    base: Config, rules: list[str], lrs: dict[str, float], steps: int
) -> dict[str, float]:
    """Seconds per training step of each rule, one thread, interleaved round-robin."""
    torch.set_num_threads(1)
    splits = load_dataset(base.data)
    x, y = next(iter(make_loader(splits.train, base.train.batch_size, shuffle=True, seed=0)))
    runners = {
        r: LocalRunner([base_spec(_cfg(base, r, lrs[r], 0, 1, "/tmp"), splits)]) for r in rules
    }
    for runner in runners.values():  # warm up allocators and kernels
        for _ in range(5):
            runner.step(x, y)
    spent = dict.fromkeys(rules, 0.0)
    for _ in range(steps // 10):
        for r, runner in runners.items():
            t0 = time.perf_counter()
            for _ in range(10):
                runner.step(x, y)
            spent[r] += time.perf_counter() - t0
    return {r: s / (steps // 10 * 10) for r, s in spent.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--config", help="TOML config (defaults: the digits ResNet of `reclra train`)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates searched per rule")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--timing-steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = load_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    rules = args.rules.split(",")
    splits = load_dataset(base.data)
    runs: dict[str, dict[float, list]] = {r: {} for r in rules}
    for rule in rules:
        for lr in lrs:
            runs[rule][lr] = [
                train(
                    _cfg(base, rule, lr, s, args.epochs, "/tmp/reclra-bench"),
                    quiet=True,
                    splits=splits,
                    track_test=True,
                )
                for s in seeds
            ]
            finals = [r.epochs[-1]["val_acc"] for r in runs[rule][lr]]
            print(f"{rule:<9} lr={lr:<7g} val acc {statistics.mean(finals):.4f}", flush=True)
    chosen = {
        r: max(
            lrs, key=lambda lr, r=r: statistics.mean(x.epochs[-1]["val_acc"] for x in runs[r][lr])
        )
        for r in rules
    }
    times = step_times(base, rules, chosen, args.timing_steps)
    bp_final = (
        statistics.mean(x.test_acc for x in runs["backprop"][chosen["backprop"]])
        if "backprop" in rules
        else None
    )
    result = {
        "dataset": base.data.name,
        "model": f"{base.model.name}-w{base.model.width}{'-bn' if base.model.batchnorm else ''}",
        "epochs": args.epochs,
        "seeds": seeds,
        "lr_grid": lrs,
        "rules": {},
    }
    for rule in rules:
        picked = runs[rule][chosen[rule]]
        accs = [x.test_acc for x in picked]
        to_target = (
            [
                next((e["epoch"] for e in x.epochs if e["test_acc"] >= 0.95 * bp_final), None)
                for x in picked
            ]
            if bp_final
            else []
        )
        reached = [t for t in to_target if t is not None]
        result["rules"][rule] = {
            "lr": chosen[rule],
            "test_acc_mean": statistics.mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_acc_per_seed": accs,
            "epochs_to_target": statistics.mean(reached)
            if len(reached) == len(to_target) and reached
            else None,
            "step_seconds": times[rule],
            "step_time_ratio": times[rule] / times["backprop"] if "backprop" in times else None,
            "test_curve_mean": [
                statistics.mean(x.epochs[i]["test_acc"] for x in picked) for i in range(args.epochs)
            ],
        }
    print(format_table(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    lines = [
        f"digits, {result['model']}, {result['epochs']} epochs, seeds {result['seeds']}",
        f"{'rule':<9} {'lr':>7} {'test acc':>15} {'ep->95%bp':>9} {'step/bp':>8}",
    ]
    for rule, r in result["rules"].items():
        ep = r["epochs_to_target"]
        ratio = r["step_time_ratio"]
        lines.append(
            f"{rule:<9} {r['lr']:>7g} {r['test_acc_mean']:>8.4f}±{r['test_acc_std']:.4f} "
            f"{'-' if ep is None else f'{ep:.2f}':>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
