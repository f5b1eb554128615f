"""Benchmark: every rule on the same network, data and epochs, several seeds, side by side.

    python -m bench.accuracy --data fashion_mnist --json bench/results/accuracy_fashion.json
    python -m bench.accuracy --data fashion_mnist --budget short --json ...
    python -m bench.accuracy --data fashion_mnist --budget depth --rules rec_lra,backprop ...
    python -m bench.accuracy --data digits --json bench/results/accuracy_digits.json

Each rule (or preset: rec_lra_paper) trains with its own recipe (workers/rules/recipes.py). Its
learning rate is chosen on the validation split, never on test: every rate of --lrs trains the
--select-seeds (seeds no table reports), the rate with the best mean final validation accuracy
wins, and while the winner sits at an end of the grid the grid is widened by a factor of 3 that
way (up to --widen times), so every choice is bracketed. The chosen rate then trains the
reported --seeds, and their test accuracy is what the table shows. Runs go two at a time in
separate one-thread processes (--workers).

Step-time ratios: every rule in a process of its own, one thread, timed in alternating rounds
(bench/step_time.py). Convergence: the epochs each rule takes to reach 95% of backprop's final
test accuracy, with the weight mirror's time counted in (as the fraction of an epoch it took).
Fashion-MNIST is read in place from --data-root (default ../shared/data beside the checkout);
where it is absent the benchmark says so, writes {"skipped": ...} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.accuracy_runs import run_all, select
from bench.budgets import BUDGETS
from bench.output import save
from bench.step_time import ratios, step_seconds
from driver.config import Config, config_to_dict, load_config, with_rule
from driver.data.common import DataError
from driver.data.load import load_dataset
from workers.rules.recipes import computes, recipe

RULES = ("rec_lra", "rec_lra_paper", "backprop", "kp", "sign", "fa", "dfa", "lra_e")
GRID = "3e-4,1e-3,3e-3,1e-2,3e-2"


def base_config(args: argparse.Namespace) -> Config:
    budget = BUDGETS["digits" if args.data == "digits" else args.budget]
    sets = budget.sets(args.data, args.data_root)
    rules = json.dumps(args.rules.split(","))  # so that compare.<rule> tables may tune them
    sets += [f"train.compare={rules}", "train.log_every=1000000"]
    for flag, key in (
        (args.epochs, "train.epochs"),
        (args.batch, "train.batch_size"),
        (args.train_size, "data.train_size"),
        (args.model, "model.name"),
        (args.width, "model.width"),
    ):
        if flag is not None:
            sets.append(f"{key}={json.dumps(flag)}")
    return load_config(args.config, sets + list(args.set))


def _cfg(base: Config, rule: str, lr: float, seed: int) -> Config:
    """`base` trained by `rule` with its own recipe (and any [compare.<rule>] table), at `lr`."""
    cfg = with_rule(base, rule)
    out = f"/tmp/reclra-bench/{rule}-{lr:g}-{seed}"
    return replace(
        cfg,
        optim=replace(cfg.optim, lr=lr),
        train=replace(cfg.train, seed=seed, out_dir=out, compare=()),
        compare={},
    )


def search(base: Config, rules: list[str], grid: list[float], seeds: list[int], args) -> dict:  # noqa: ANN001
    """runs[rule][lr] = the selection runs, the grid widened until each rule's best is interior."""
    runs: dict[str, dict[float, list[dict]]] = {r: {} for r in rules}
    todo = [(r, lr) for r in rules for lr in grid]
    for _ in range(args.widen + 1):
        pairs = [(r, lr, s) for r, lr in todo for s in seeds]
        cfgs = [_cfg(base, r, lr, s) for r, lr, s in pairs]
        selection = run_all(cfgs, args.workers, track_test=False)  # validation only
        for (r, lr, _), out in zip(pairs, selection, strict=True):
            runs[r].setdefault(lr, []).append(out)
        todo = []
        for r, lr in select(runs).items():
            tried = sorted(runs[r])
            if lr == tried[-1]:
                todo.append((r, lr * 3))
            elif lr == tried[0]:
                todo.append((r, lr / 3))
        if not todo:
            break
        print("widening the grid: " + ", ".join(f"{r} {lr:g}" for r, lr in todo), flush=True)
    return runs


def summarise(base: Config, search_runs: dict, runs: dict, chosen: dict, times: dict) -> dict:
    """The JSON: per rule its recipe, chosen lr, test accuracy over seeds, convergence, speed."""
    bp = runs.get("backprop")
    bp_final = statistics.mean(r["test_acc"] for r in bp) if bp else None
    rel = ratios(times, "backprop") if "backprop" in times else {}
    rules: dict[str, dict] = {}
    for rule, lr in chosen.items():
        picked = runs[rule]
        accs = [r["test_acc"] for r in picked]
        n_ep = min(len(r["epochs"]) for r in picked)
        reach, reach_timed = [], []
        for r in picked:
            epoch = None
            if bp_final:
                hit = [e["epoch"] for e in r["epochs"] if e["test_acc"] >= 0.95 * bp_final]
                epoch = hit[0] if hit else None
            reach.append(epoch)
            per_epoch = r["train_seconds"] / max(len(r["epochs"]), 1)
            extra = r["mirror_seconds"] / per_epoch if per_epoch else 0.0
            reach_timed.append(None if epoch is None else epoch + extra)
        done = bool(reach) and None not in reach
        rules[rule] = {
            "lr": lr,
            "computes": computes(rule),
            "recipe": {"rule": recipe(rule, "rule"), "optim": recipe(rule, "optim")},
            "test_acc_mean": statistics.mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_acc_per_seed": accs,
            "val_acc_mean": statistics.mean(r["epochs"][-1]["val_acc"] for r in picked),
            "epochs_to_target": statistics.mean(reach) if done else None,  # type: ignore[arg-type,type-var]
            "epochs_to_target_with_mirror": statistics.mean(reach_timed) if done else None,  # type: ignore[arg-type,type-var]
            "mirror_seconds_mean": statistics.mean(r["mirror_seconds"] for r in picked),
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in picked),
            "step_seconds": times.get(rule, {}).get("step_seconds"),
            "step_time_ratio": rel.get(rule),
            "test_curve_mean": [
                statistics.mean(r["epochs"][i]["test_acc"] for r in picked) for i in range(n_ep)
            ],
            "val_by_lr": {
                f"{x:g}": statistics.mean(r["epochs"][-1]["val_acc"] for r in v)
                for x, v in sorted(search_runs[rule].items())
            },
        }
    m = base.model
    return {
        "dataset": base.data.name,
        "model": f"{m.name}-w{m.width}{'-bn' if m.batchnorm else ''}",
        "epochs": base.train.epochs,
        "batch_size": base.train.batch_size,
        "train_size": len(load_dataset(base.data).train),  # type: ignore[arg-type,type-var]
        "rules": rules,
        "targets": targets(rules),
        "config": config_to_dict(base),
    }


def targets(rules: dict) -> dict:
    """The issue's targets, measured: rec-LRA against backprop, FA and DFA."""
    if "rec_lra" not in rules or "backprop" not in rules:
        return {}
    rl, bp = rules["rec_lra"], rules["backprop"]
    out = {"gap_to_backprop_points": 100 * (rl["test_acc_mean"] - bp["test_acc_mean"])}
    out["within_half_point"] = out["gap_to_backprop_points"] >= -0.5
    out["within_one_point"] = out["gap_to_backprop_points"] >= -1.0
    e_rl, e_bp = rl["epochs_to_target_with_mirror"], bp["epochs_to_target"]
    out["converges_no_later"] = e_rl is not None and e_bp is not None and e_rl <= e_bp
    for other in ("fa", "dfa"):
        if other in rules:
            margin = 100 * (rl["test_acc_mean"] - rules[other]["test_acc_mean"])
            out[f"margin_over_{other}_points"] = margin
    for rule, r in rules.items():
        if r["step_time_ratio"] is not None and rule != "backprop":
            bound = 1.05 if rule == "rec_lra" else 1.0
            out[f"step_time_ratio_{rule}_within_{bound:g}"] = r["step_time_ratio"] <= bound
    return out


def format_table(result: dict) -> str:
    lines = [
        f"{result['dataset']}, {result['model']}, {result['epochs']} epochs, batch "
        f"{result['batch_size']}, {result['train_size']} train images, seeds {result['seeds']} "
        f"(lr chosen on validation with seeds {result['select_seeds']})",
        f"{'rule':<14} {'lr':>7} {'test acc':>15} {'ep->95%bp':>9} {'step/bp':>8}  recipe",
    ]
    for rule, r in result["rules"].items():
        ep, ratio = r["epochs_to_target_with_mirror"], r["step_time_ratio"]
        knobs = {**r["recipe"]["rule"], "wd": r["recipe"]["optim"].get("weight_decay")}
        lines.append(
            f"{rule:<14} {r['lr']:>7g} {r['test_acc_mean']:>8.4f}±{r['test_acc_std']:.4f} "
            f"{'-' if ep is None else f'{ep:.2f}':>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>8}  "
            + ", ".join(f"{k}={v}" for k, v in knobs.items())
        )
    lines += [f"{k}: {v}" for k, v in result.get("targets", {}).items()]
    lines += ["", *(f"{rule}: {computes(rule)}" for rule in result["rules"] if computes(rule))]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--data", default="digits", choices=["digits", "fashion_mnist", "mnist"])
    p.add_argument("--budget", default="default", choices=["default", "short", "depth"])
    p.add_argument("--data-root", help="folder holding FashionMNIST/ or MNIST/")
    p.add_argument("--config", help="TOML config under the benchmark's settings")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="section.key=value, repeatable; a rule's own settings go in compare tables: "
        "--set compare.backprop.optim.weight_decay=0.1",
    )
    p.add_argument("--model")
    p.add_argument("--width", type=int)
    p.add_argument("--epochs", type=int, help="default: the budget's")
    p.add_argument("--batch", type=int, help="default: the budget's")
    p.add_argument("--train-size", type=int, help="default: the budget's")
    p.add_argument("--seeds", default="0,1,2", help="the reported seeds")
    p.add_argument("--select-seeds", default="100", help="seeds that choose the lr (unreported)")
    p.add_argument("--lrs", default=GRID, help="learning rates searched per rule")
    p.add_argument("--widen", type=int, default=3, help="grid widenings at most")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--timing-steps", type=int, default=5, help="steps per timing round")
    p.add_argument(
        "--timing-size", type=int, default=0, help="time steps at size x size inputs (0: as is)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    base = base_config(args)
    try:
        splits = load_dataset(base.data)
    except DataError as err:
        msg = f"bench.accuracy: skipped, the {args.data} data is not here ({err})"
        print(msg, file=sys.stderr)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"skipped": msg}))
        return {"skipped": msg}
    seeds = [int(s) for s in args.seeds.split(",")]
    select_seeds = [int(s) for s in args.select_seeds.split(",")]
    if set(seeds) & set(select_seeds):
        raise SystemExit("bench.accuracy: --select-seeds must not be reported seeds (--seeds)")
    rules = args.rules.split(",")
    search_runs = search(base, rules, [float(v) for v in args.lrs.split(",")], select_seeds, args)
    chosen = select(search_runs)
    for r, lr in chosen.items():
        print(f"{r:<14} lr {lr:g} chosen on validation", flush=True)
    pairs = [(r, chosen[r], s) for r in rules for s in seeds]
    outs = run_all([_cfg(base, r, lr, s) for r, lr, s in pairs], args.workers)
    runs: dict[str, list[dict]] = {r: [] for r in rules}
    for (r, _, _), out in zip(pairs, outs, strict=True):
        runs[r].append(out)
    shape = None
    if args.timing_size:
        shape = (splits.input_shape[0], args.timing_size, args.timing_size)
    times = step_seconds(
        {r: _cfg(base, r, lr, 0) for r, lr in chosen.items()},
        rounds=args.timing_rounds,
        steps=args.timing_steps,
        input_shape=shape,
    )
    result = summarise(base, search_runs, runs, chosen, times)
    result["seeds"], result["select_seeds"] = seeds, select_seeds
    result["budget"] = "digits" if args.data == "digits" else args.budget
    result["lr_grid"] = sorted({lr for by_lr in search_runs.values() for lr in by_lr})
    result["timing"] = {"rounds": args.timing_rounds, "steps": args.timing_steps, "size": shape}
    result["wall_seconds"] = time.perf_counter() - t0
    return save(result, args.json, format_table(result))


if __name__ == "__main__":
    main()
