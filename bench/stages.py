"""Decoupled stages against the chained rule and backprop: test accuracy at K = 1 to 4.

    python -m bench.stages --data fashion_mnist --json bench/results/stages_fashion.json
    python -m bench.stages --data fashion_mnist --select --json bench/results/stages_select.json

Rows, each rule with its own recipe and the lr chosen for it on validation data:
`backprop` (K = 1), `chained` (rec_lra, the mirror preset, K = 1: every stage count gives the
same weights under sync) and `decoupled` (rec_lra_decoupled at K = 2, 3, 4: each stage learns
from an auxiliary head of its own). The stages run in this process (pipeline.backend = local,
sync): the same numbers as on Ray (tests/test_pipeline.py). Cuts are fixed, even by blocks, so
that a run does not depend on timing: ResNet-8 (stem, layer1.0, layer2.0, layer3.0, head) cut
before block 3 (K = 2), 2 and 3 (K = 3), 1, 2 and 3 (K = 4); ResNet-18 before block 5, 3 and
6, 3, 5 and 7.

The ResNet-8 rows use the accuracy benchmark's default budget (20,000 images, 4 epochs); the
ResNet-18 w32 rows its depth budget (10,000 images, 3 epochs), over --resnet18-seeds.

`--select` trains the decoupled design's variants (head shape, reconstruction term, cuts,
learning rate) on the selection seed, validation only, and writes their accuracies: how the
`rec_lra_decoupled` recipe was chosen (docs/algorithm.md#decoupled-stages).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.accuracy_runs import run_all
from bench.budgets import BUDGETS
from bench.output import save
from driver.config import Config, load_config
from driver.config.root import with_rule
from driver.data.common import DataError
from driver.data.load import load_dataset

BOUNDS = {
    "resnet8": {2: (3,), 3: (2, 3), 4: (1, 2, 3)},
    "resnet18": {2: (5,), 3: (3, 6), 4: (3, 5, 7)},
}
RESULTS = Path(__file__).resolve().parent / "results"
# where each row's lr comes from: the accuracy benchmark's choice on validation, per budget
LR_SOURCES = {"default": "accuracy_fashion.json", "depth": "accuracy_fashion_resnet18.json"}
ROW_RULE = {"backprop": "backprop", "chained": "rec_lra", "decoupled": "rec_lra_decoupled"}
TARGETS = {  # decoupled at K may lose at most this many points against chained (K = 1)
    "resnet8": {"2": 2.0, "4": 4.0},
    "resnet18": {"2": 1.5, "4": 3.0},
}
# --select: (name, K, {rule keys}, lr, boundaries or None for BOUNDS)
VARIANTS: list[tuple[str, int, dict[str, Any], float, tuple[int, ...] | None]] = [
    *[
        (f"k2 {h}", 2, {"aux_head": h}, 3e-3, None)
        for h in ("linear", "pointwise", "conv", "conv2")
    ],
    *[
        (f"k4 {h}", 4, {"aux_head": h}, 3e-3, None)
        for h in ("linear", "pointwise", "conv", "conv2")
    ],
    *[(f"k4 conv recon {w:g}", 4, {"aux_recon": w}, 3e-3, None) for w in (1.0, 5.0)],
    ("k2 conv cut before 2", 2, {}, 3e-3, (2,)),
    *[(f"k{k} conv lr {lr:g}", k, {}, lr, None) for k in (2, 4) for lr in (1e-3, 1e-2)],
]


def _base(args: argparse.Namespace, budget: str) -> Config:
    sets = BUDGETS[budget].sets(args.data, args.data_root)
    sets += ["train.compare=[]", "train.log_every=1000000", 'pipeline.backend="local"']
    return load_config(None, sets + list(args.set))


def _cfg(
    base: Config,
    rule: str,
    k: int,
    lr: float,
    seed: int,
    *,
    keys: dict[str, Any] | None = None,
    bounds: tuple[int, ...] | None = None,
    tag: str = "",
) -> Config:
    cfg = with_rule(base, rule)
    cut = () if k == 1 else (bounds or BOUNDS[cfg.model.name][k])
    return replace(
        cfg,
        rule=replace(cfg.rule, **(keys or {})),
        optim=replace(cfg.optim, lr=lr),
        pipeline=replace(cfg.pipeline, stages=k, boundaries=cut),
        train=replace(
            cfg.train, seed=seed, out_dir=f"/tmp/reclra-bench/stages-{rule}-{k}-{seed}{tag}"
        ),
    )


def _lrs(args: argparse.Namespace, budget: str) -> dict[str, float]:
    """Each row's lr: --lr, else the accuracy benchmark's validation choice for its rule,
    else the rule's recipe."""
    chosen: dict[str, float] = {}
    source = RESULTS / LR_SOURCES[budget]
    if source.is_file():
        rules = json.loads(source.read_text()).get("rules", {})
        chosen = {row: rules[r]["lr"] for row, r in ROW_RULE.items() if r in rules}
    for item in args.lr:
        row, _, value = item.partition("=")
        chosen[row] = float(value)
    return chosen


def plan(args: argparse.Namespace, budget: str, seeds: list[int]) -> list[tuple]:
    """(budget, row, K, lr, seed, config) of every run of one budget's rows."""
    base = _base(args, budget)
    lrs = _lrs(args, budget)
    todo = []
    for row, k in [("backprop", 1), ("chained", 1)] + [("decoupled", k) for k in (2, 3, 4)]:
        rule = ROW_RULE[row]
        lr = lrs.get(row, with_rule(base, rule).optim.lr)
        todo += [
            (budget, row, k, lr, s, _cfg(base, rule, k, lr, s, tag=f"-{budget}")) for s in seeds
        ]
    return todo


def rows(todo: list[tuple], outs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows of one budget from its runs: per row and K, test accuracy over seeds."""
    out: dict[str, dict[str, Any]] = {}
    for (_, row, k, lr, _, cfg), run in zip(todo, outs, strict=True):
        cell = out.setdefault(row, {}).setdefault(str(k), {"lr": lr, "runs": []})
        cell["boundaries"] = list(cfg.pipeline.boundaries)
        cell["runs"].append(run)
    for cells in out.values():
        for cell in cells.values():
            runs = cell.pop("runs")
            accs = [r["test_acc"] for r in runs]
            cell["test_acc_mean"] = statistics.mean(accs)
            cell["test_acc_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cell["test_acc_per_seed"] = accs
            cell["val_acc_mean"] = statistics.mean(r["epochs"][-1]["val_acc"] for r in runs)
            cell["train_seconds_mean"] = statistics.mean(r["train_seconds"] for r in runs)
            cell["test_curve_mean"] = [
                statistics.mean(r["epochs"][i]["test_acc"] for r in runs)
                for i in range(min(len(r["epochs"]) for r in runs))
            ]
            exits = [r.get("exit_test_acc") for r in runs]
            if all(exits):
                cell["exit_test_acc_mean"] = [statistics.mean(v) for v in zip(*exits, strict=True)]
    return out


def targets(model: str, rows: dict[str, Any]) -> dict[str, Any]:
    chained = rows["chained"]["1"]["test_acc_mean"]
    out = {}
    for k, bound in TARGETS[model].items():
        gap = 100 * (rows["decoupled"][k]["test_acc_mean"] - chained)
        out[f"k{k}_gap_points"] = gap
        out[f"k{k}_within_{bound:g}"] = gap >= -bound
    return out


def select(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on the selection seed, validation accuracy only."""
    base = _base(args, "default")
    seed = int(args.select_seed)
    cfgs = [
        _cfg(base, "rec_lra_decoupled", k, lr, seed, keys=keys, bounds=bounds, tag=f"-v{i}")
        for i, (_, k, keys, lr, bounds) in enumerate(VARIANTS)
    ]
    outs = run_all(cfgs, args.workers, track_test=False)
    table = {}
    for (name, k, keys, lr, _), cfg, run in zip(VARIANTS, cfgs, outs, strict=True):
        table[name] = {
            "k": k,
            "keys": keys,
            "lr": lr,
            "boundaries": list(cfg.pipeline.boundaries),
            "val_acc": run["epochs"][-1]["val_acc"],
            "val_curve": [e["val_acc"] for e in run["epochs"]],
            "train_seconds": run["train_seconds"],
        }
        print(f"{name:<24} val {table[name]['val_acc']:.4f}", flush=True)
    return {"select_seed": seed, "variants": table}


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for model, block in (("resnet8", result), ("resnet18", result.get("resnet18"))):
        if not block:
            continue
        lines += [f"{model}: test accuracy (mean ± std over seeds {block['seeds']})"]
        lines += ["row        K  lr       test acc          exits"]
        for row, cells in block["rows"].items():
            for k, c in cells.items():
                exits = " ".join(f"{a:.3f}" for a in c.get("exit_test_acc_mean", []))
                lines.append(
                    f"{row:<10} {k}  {c['lr']:<8g} {c['test_acc_mean']:.4f} ± "
                    f"{c['test_acc_std']:.4f}  {exits}"
                )
        lines += [f"targets: {block.get('targets')}", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    p.add_argument("--data-root", help="folder holding FashionMNIST/ or MNIST/")
    p.add_argument("--set", action="append", default=[], help="section.key=value, repeatable")
    p.add_argument("--seeds", default="0,1,2", help="ResNet-8 seeds")
    p.add_argument("--resnet18-seeds", default="0", help="ResNet-18 w32 seeds ('' skips it)")
    p.add_argument("--lr", action="append", default=[], help="row=lr, e.g. decoupled=0.003")
    p.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    p.add_argument("--select", action="store_true", help="the recipe's selection runs instead")
    p.add_argument("--select-seed", default="100")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    t0 = time.perf_counter()
    try:
        load_dataset(_base(args, "default").data)
    except DataError as err:
        msg = f"bench.stages: skipped, the {args.data} data is not here ({err})"
        print(msg, file=sys.stderr)
        return save({"skipped": msg}, args.json)
    if args.select:
        result = select(args)
        result["wall_seconds"] = time.perf_counter() - t0
        return save(result, args.json)
    seeds = [int(s) for s in args.seeds.split(",")]
    deep_seeds = [int(s) for s in args.resnet18_seeds.split(",") if s]
    todo = plan(args, "depth", deep_seeds) if deep_seeds else []  # the longest runs first
    todo += plan(args, "default", seeds)
    outs = run_all([t[-1] for t in todo], args.workers)
    budget = BUDGETS["default"]
    mine = [i for i, t in enumerate(todo) if t[0] == "default"]
    result: dict[str, Any] = {
        "model": f"{budget.model}-w{budget.width}",
        "dataset": args.data,
        "epochs": budget.epochs,
        "train_size": budget.train_size,
        "seeds": seeds,
        "lrs": _lrs(args, "default"),
        "rows": rows([todo[i] for i in mine], [outs[i] for i in mine]),
    }
    result["targets"] = targets("resnet8", result["rows"])
    if deep_seeds:
        deep = BUDGETS["depth"]
        mine = [i for i, t in enumerate(todo) if t[0] == "depth"]
        r18 = rows([todo[i] for i in mine], [outs[i] for i in mine])
        result["resnet18"] = {
            "model": f"{deep.model}-w{deep.width}",
            "epochs": deep.epochs,
            "train_size": deep.train_size,
            "seeds": deep_seeds,
            "lrs": _lrs(args, "depth"),
            "rows": r18,
            "targets": targets("resnet18", r18),
        }
    result["wall_seconds"] = time.perf_counter() - t0
    return save(result, args.json, format_table(result))


if __name__ == "__main__":
    main()
