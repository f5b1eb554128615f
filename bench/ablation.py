"""Ablations of rec-LRA's settings, on validation data only, over seeds that no table reports.

    python -m bench.ablation --budget short --json bench/results/ablation_short.json
    python -m bench.ablation --budget default --only alignment --json ...

Each variant is rec-LRA's default (its `mirror` preset) with a few keys changed, or another
rule or preset for reference; every variant trains on the same network, data, epochs and seeds
(--seeds, default 100 and 101: never the reported seeds 0, 1, 2). The table gives the mean and
spread of the final validation accuracy, and the wall time per run including the weight mirror.
Runs go two at a time in one-thread processes. The choices these runs made are in
docs/results.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.accuracy_runs import run_all
from bench.budgets import BUDGETS
from bench.output import save
from driver.config import load_config
from driver.data.common import DataError
from driver.data.load import load_dataset

# group -> variant -> the --set items over rec-LRA's default (the first of each group is the
# reference the group is read against)
VARIANTS: dict[str, dict[str, list[str]]] = {
    "alignment": {
        "default": [],
        "no mirror (KP from zero)": ["rule.mirror_angle=0.0"],
        "mirror 5 deg": ["rule.mirror_angle=5.0"],
        "mirror 20 deg": ["rule.mirror_angle=20.0"],
        "mirror + interleaved every 50": ["rule.mirror_every=50"],
        "KP from a random start, no mirror": ['rule.kp_init="kaiming"', "rule.mirror_angle=0.0"],
        "mirror, E fixed after it (no KP)": ['rule.feedback_update="fixed"'],
    },
    "head": {
        "default": [],
        "head from zero, no mirror (the old default)": [
            'rule.head_init="zeros"',
            "rule.mirror_angle=0.0",
        ],
        "head from zero, mirror": ['rule.head_init="zeros"'],
    },
    "batchnorm": {
        "default": [],
        "fully local: E carries the post-BN error (carry_bn off)": ["rule.carry_bn=false"],
        "no BatchNorm at all": ["model.batchnorm=false"],
    },
    "targets": {
        "default": [],
        "beta 0.01": ["rule.beta=0.01"],
        "beta 0.5": ["rule.beta=0.5"],
        "e = z - y (rescale_error off)": ["rule.rescale_error=false"],
        "topology adjacent": ['rule.topology="adjacent"'],
        "L1/L2 mix 0.24 (reported)": ["rule.mix_adjacent=0.24"],
        "input noise 0.1 + re-projection 1 (reported)": [
            "rule.input_noise=0.1",
            "rule.reproject=1.0",
        ],
    },
    "paper": {
        "paper preset, lr 1e-3": ['rule.preset="paper"', "optim.lr=0.001"],
        "paper preset, lr 3e-4": ['rule.preset="paper"', "optim.lr=0.0003"],
        "paper preset, lr 3e-3": ['rule.preset="paper"', "optim.lr=0.003"],
        "paper preset, re-projection 10": ['rule.preset="paper"', "rule.reproject=10.0"],
        "paper preset, re-projection 0.1": ['rule.preset="paper"', "rule.reproject=0.1"],
        "paper preset, weight decay 1.0": ['rule.preset="paper"', "optim.weight_decay=1.0"],
        "paper preset, Kaiming init": [
            'rule.preset="paper"',
            'rule.init="kaiming"',
            'rule.feedback_init="kaiming"',
            'rule.kp_init="kaiming"',
            'rule.head_init="kaiming"',
        ],
    },
    "reference": {
        "backprop": ["rule.name=backprop"],
    },
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--budget", default="short", choices=[b for b in BUDGETS if b != "digits"])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", help="folder holding FashionMNIST/ (default ../shared/data)")
    p.add_argument("--only", help="comma-separated groups (default: all)")
    p.add_argument("--seeds", default="100,101", help="never the reported seeds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="section.key=value for all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    budget = BUDGETS[args.budget]
    base_sets = [*budget.sets(args.data, args.data_root), "train.compare=[]"]
    base_sets += ["train.log_every=1000000", *args.set]
    try:
        load_dataset(load_config(None, base_sets).data)
    except DataError as err:
        msg = f"bench.ablation: skipped, the {args.data} data is not here ({err})"
        print(msg, file=sys.stderr)
        return save({"skipped": msg}, args.json)
    groups = args.only.split(",") if args.only else list(VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(g, v, s) for g in groups for v in VARIANTS[g] for s in seeds]
    cfgs = []
    for g, v, s in todo:
        out = f'train.out_dir="/tmp/reclra-ablation/{g}/{abs(hash(v))}-{s}"'
        cfgs.append(load_config(None, [*base_sets, *VARIANTS[g][v], f"train.seed={s}", out]))
    outs = run_all(cfgs, args.workers, track_test=False)
    rows: dict[str, dict[str, dict]] = {g: {} for g in groups}
    for (g, v, _), cfg, out in zip(todo, cfgs, outs, strict=True):
        row = rows[g].setdefault(v, {"sets": VARIANTS[g][v], "label": cfg.rule.label, "runs": []})
        row["runs"].append(out)
    for g in rows:
        for row in rows[g].values():
            vals = [r["epochs"][-1]["val_acc"] for r in row["runs"]]
            row["val_acc_mean"] = statistics.mean(vals)
            row["val_acc_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["val_acc_per_seed"] = vals
            row["val_curve_mean"] = [
                statistics.mean(r["epochs"][i]["val_acc"] for r in row["runs"])
                for i in range(len(row["runs"][0]["epochs"]))
            ]
            row["train_seconds_mean"] = statistics.mean(r["train_seconds"] for r in row["runs"])
            row["mirror_seconds_mean"] = statistics.mean(r["mirror_seconds"] for r in row["runs"])
            row.pop("runs")
    result = {
        "budget": args.budget,
        "budget_settings": budget.__dict__,
        "dataset": args.data,
        "seeds": seeds,
        "groups": rows,
        "wall_seconds": time.perf_counter() - t0,
    }
    return save(result, args.json, format_table(result))


def format_table(result: dict) -> str:
    lines = [
        f"{result['dataset']}, budget {result['budget']} {result['budget_settings']}, "
        f"seeds {result['seeds']}: final validation accuracy"
    ]
    for g, rows in result["groups"].items():
        lines += ["", f"[{g}]", f"{'variant':<58} {'val acc':>15} {'train s':>8} {'mirror s':>8}"]
        for v, r in rows.items():
            lines.append(
                f"{v[:58]:<58} {r['val_acc_mean']:>8.4f}±{r['val_acc_std']:.4f} "
                f"{r['train_seconds_mean']:>8.1f} {r['mirror_seconds_mean']:>8.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
