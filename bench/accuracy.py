"""Benchmark: every rule on the same network, data and epochs, several seeds, side by side.

    python -m bench.accuracy --data fashion_mnist --json results.json
    python -m bench.accuracy --data digits --json results.json

Each rule trains with its own recipe (workers/rules/recipes.py). Its learning rate is chosen from
--lrs on the validation split (final validation accuracy, mean over --select-seeds), never on
test; the chosen rate then trains every seed and the test accuracy of those runs is reported.
Runs go two at a time in separate one-thread processes (--workers). Step-time ratios are timed
in this process, one thread, rules interleaved round-robin so machine noise hits them alike.
Fashion-MNIST and MNIST are read in place from --data-root (default ../shared/data beside the
checkout); where they are absent the benchmark says so, writes {"skipped": ...} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.accuracy_runs import run_all, select
from bench.output import save
from driver.config import Config, config_to_dict, load_config, with_rule
from driver.data.common import DataError
from driver.data.load import load_dataset, make_loader
from driver.pipeline.build import base_spec
from workers.chain import LocalRunner
from workers.rules.recipes import recipe

RULES = ("rec_lra", "backprop", "lra_e", "dfa", "fa")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# per dataset: epochs, batch size, train_size (0: all). Sized so all five rules, three seeds
# and the learning-rate search fit in 45 minutes on a 2-core machine.
PRESETS = {"digits": (10, 32, 0), "fashion_mnist": (4, 64, 20_000), "mnist": (4, 64, 20_000)}


def base_config(args: argparse.Namespace) -> Config:
    epochs, batch, train_size = PRESETS.get(args.data, (10, 32, 0))
    sets = [f"data.name={json.dumps(args.data)}", "train.compare=[]", "train.log_every=1000000"]
    if args.data != "digits":
        root = args.data_root or str(SHARED)
        size = train_size if args.train_size is None else args.train_size
        sets += [f"data.root={json.dumps(root)}", f"data.train_size={size}"]
    sets += [f"train.epochs={args.epochs or epochs}", f"train.batch_size={args.batch or batch}"]
    sets += [f"model.name={json.dumps(args.model)}", f"model.width={args.width}"]
    return load_config(args.config, sets + list(args.set))


def _cfg(base: Config, rule: str, lr: float, seed: int, sets: tuple[str, ...] = ()) -> Config:
    """`base` trained by `rule` with its own recipe, then the --set rule/optim keys, and `lr`."""
    cfg = with_rule(base, rule)
    own = [s for s in sets if s.split(".", 1)[0].strip() in ("rule", "optim")]
    if own:  # parsed and validated like any config, over the rule's recipe
        mine = load_config(None, [f"rule.name={rule}", *own])
        keys = {s.split("=", 1)[0].split(".", 1)[1].strip() for s in own if s.startswith("optim")}
        optim = replace(cfg.optim, **{k: getattr(mine.optim, k) for k in keys})
        cfg = replace(cfg, rule=mine.rule, optim=optim)
    out = f"/tmp/reclra-bench/{rule}-{lr:g}-{seed}"
    return replace(
        cfg,
        optim=replace(cfg.optim, lr=lr),
        train=replace(cfg.train, seed=seed, out_dir=out, compare=()),
    )


def step_times(
    base: Config, chosen: dict[str, float], steps: int, sets: tuple[str, ...] = ()
) -> dict[str, float]:
    """Seconds per training step of each rule, one thread, interleaved round-robin."""
    torch.set_num_threads(1)
    splits = load_dataset(base.data)
    x, y = next(iter(make_loader(splits.train, base.train.batch_size, shuffle=True, seed=0)))
    runners = {
        r: LocalRunner([base_spec(_cfg(base, r, lr, 0, sets), splits)]) for r, lr in chosen.items()
    }
    for runner in runners.values():  # warm up allocators and kernels
        for _ in range(5):
            runner.step(x, y)
    spent = dict.fromkeys(runners, 0.0)
    rounds = max(1, steps // 10)
    for _ in range(rounds):
        for r, runner in runners.items():
            t0 = time.perf_counter()
            for _ in range(10):
                runner.step(x, y)
            spent[r] += time.perf_counter() - t0
    return {r: s / (rounds * 10) for r, s in spent.items()}


def summarise(base: Config, runs: dict, chosen: dict, times: dict, seeds: list[int]) -> dict:
    """The JSON: per rule its recipe, chosen lr, test accuracy over seeds, convergence, speed."""
    bp = runs.get("backprop", {}).get(chosen.get("backprop"))
    bp_final = statistics.mean(r["test_acc"] for r in bp) if bp else None
    rules: dict[str, dict] = {}
    for rule, lr in chosen.items():
        picked = runs[rule][lr]
        accs = [r["test_acc"] for r in picked]
        reach = (
            [
                next((e["epoch"] for e in r["epochs"] if e["test_acc"] >= 0.95 * bp_final), None)
                for r in picked
            ]
            if bp_final
            else []
        )
        n_ep = min(len(r["epochs"]) for r in picked)
        rules[rule] = {
            "lr": lr,
            "recipe": {"rule": recipe(rule, "rule"), "optim": recipe(rule, "optim")},
            "test_acc_mean": statistics.mean(accs),
            "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_acc_per_seed": accs,
            "val_acc_mean": statistics.mean(r["epochs"][-1]["val_acc"] for r in picked),
            "epochs_to_target": statistics.mean(reach)  # type: ignore[arg-type]
            if reach and None not in reach
            else None,
            "step_seconds": times.get(rule),
            "step_time_ratio": times[rule] / times["backprop"]
            if rule in times and "backprop" in times
            else None,
            "test_curve_mean": [
                statistics.mean(r["epochs"][i]["test_acc"] for r in picked) for i in range(n_ep)
            ],
            "val_by_lr": {
                f"{x:g}": statistics.mean(r["epochs"][-1]["val_acc"] for r in v)
                for x, v in runs[rule].items()
            },
        }
    m = base.model
    return {
        "dataset": base.data.name,
        "model": f"{m.name}-w{m.width}{'-bn' if m.batchnorm else ''}",
        "epochs": base.train.epochs,
        "batch_size": base.train.batch_size,
        "train_size": len(load_dataset(base.data).train),  # type: ignore[arg-type]
        "seeds": seeds,
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
    e_rl, e_bp = rl["epochs_to_target"], bp["epochs_to_target"]
    out["converges_no_later"] = e_rl is not None and e_bp is not None and e_rl <= e_bp
    for other in ("fa", "dfa"):
        if other in rules:
            margin = 100 * (rl["test_acc_mean"] - rules[other]["test_acc_mean"])
            out[f"margin_over_{other}_points"] = margin
            out[f"two_points_over_{other}"] = margin >= 2.0
    return out


def format_table(result: dict) -> str:
    lines = [
        f"{result['dataset']}, {result['model']}, {result['epochs']} epochs, batch "
        f"{result['batch_size']}, {result['train_size']} train images, seeds {result['seeds']}",
        f"{'rule':<9} {'lr':>7} {'test acc':>15} {'ep->95%bp':>9} {'step/bp':>8}  recipe",
    ]
    for rule, r in result["rules"].items():
        ep, ratio = r["epochs_to_target"], r["step_time_ratio"]
        knobs = {**r["recipe"]["rule"], "wd": r["recipe"]["optim"].get("weight_decay")}
        lines.append(
            f"{rule:<9} {r['lr']:>7g} {r['test_acc_mean']:>8.4f}±{r['test_acc_std']:.4f} "
            f"{'-' if ep is None else f'{ep:.2f}':>9} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>8}  "
            + ", ".join(f"{k}={v}" for k, v in knobs.items())
        )
    lines += [f"{k}: {v}" for k, v in result.get("targets", {}).items()]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--data", default="digits", choices=["digits", *PRESETS])
    p.add_argument("--data-root", help=f"folder holding FashionMNIST/ or MNIST/ (default {SHARED})")
    p.add_argument("--config", help="TOML config under the benchmark's settings")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="section.key=value, repeatable (rule.* and optim.* apply to every rule, over "
        "its recipe)",
    )
    p.add_argument("--model", default="resnet8")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, help="default: per dataset (digits 10, others 4)")
    p.add_argument("--batch", type=int, help="default: per dataset (digits 32, others 64)")
    p.add_argument("--train-size", type=int, help="default: all (digits), 20000 (others)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--select-seeds", default="0", help="seeds whose validation picks the lr")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="learning rates searched per rule")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--workers", type=int, default=2, help="runs trained side by side")
    p.add_argument("--timing-steps", type=int, default=200)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    base = base_config(args)
    try:
        load_dataset(base.data)
    except DataError as err:
        msg = f"bench.accuracy: skipped, the {args.data} data is not here ({err})"
        print(msg, file=sys.stderr)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"skipped": msg}))
        return {"skipped": msg}
    seeds = [int(s) for s in args.seeds.split(",")]
    select_seeds = [int(s) for s in args.select_seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    rules = args.rules.split(",")
    runs: dict[str, dict[float, list[dict]]] = {r: {} for r in rules}

    def cfgs(pairs: list[tuple[str, float, int]]) -> list[Config]:
        return [_cfg(base, r, lr, s, tuple(args.set)) for r, lr, s in pairs]

    search = [(r, lr, s) for r in rules for lr in lrs for s in select_seeds]
    for (r, lr, _), out in zip(search, run_all(cfgs(search), args.workers), strict=True):
        runs[r].setdefault(lr, []).append(out)
    chosen = select(runs)
    for r, lr in chosen.items():
        print(f"{r:<9} lr {lr:g} chosen on validation", flush=True)
    rest = [(r, chosen[r], s) for r in rules for s in seeds if s not in select_seeds]
    for (r, lr, _), out in zip(rest, run_all(cfgs(rest), args.workers), strict=True):
        runs[r][lr].append(out)
    for r, lr in chosen.items():  # the reported runs: exactly the seeds asked for
        runs[r][lr] = [o for o in runs[r][lr] if o["seed"] in seeds]
    times = step_times(base, chosen, args.timing_steps, tuple(args.set))
    result = summarise(base, runs, chosen, times, seeds)
    result["lr_grid"], result["select_seeds"] = lrs, select_seeds
    result["wall_seconds"] = time.perf_counter() - t0
    return save(result, args.json, format_table(result))


if __name__ == "__main__":
    main()
