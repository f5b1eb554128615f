"""Benchmark: float32 against bf16 (train.precision) and eager against compiled (train.compile).

    python -m bench.precision --json bench/results/precision_cpu.json
    python -m bench.precision --device cuda --json bench/results/precision_gpu.json

For each rule (default rec_lra and backprop, each with its own recipe, workers/rules/recipes.py)
and each dataset, every --accuracy-variants variant trains every seed to the end, two runs at a
time in one-thread processes; the table gives each variant's mean test accuracy and its
difference to float32, paired by seed (same initial weights, same data order; the target:
within 0.3 points). Step times: every --timing-variants variant of each rule in a process of
its own, one thread, timed in alternating rounds after 2 warm-up steps, as ratios to that
rule's float32 (CPU time on CPU, wall time on CUDA). Compiled variants are timed on
--compile-data only (default digits); their compile time is their first step's seconds over
the eager variant's, in a new, empty inductor cache (a cold compile).

Budgets, chosen to finish in about 12 minutes on 2 cores: digits is bench/budgets.py's `digits`
(ResNet-8 w16, 1,197 images, 10 epochs, batch 32), seeds 0, 1, 2; Fashion-MNIST is ResNet-8 w16
on 1,000 training images, 1 epoch, batch 64, 500 validation images and the first 2,000 test
images, seeds 0, 1. Each run is tested once, at its end. Most of a CPU bf16 run is evaluation:
on a CPU without native bf16 (no AVX512-BF16 or AMX) bf16 runs several times slower than
float32, since autocast still casts and the kernels emulate bf16. Fashion-MNIST is read in
place from --data-root (default ../shared/data beside the checkout) and skipped, saying so,
where absent.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from torch.utils.data import Subset

from bench.budgets import BUDGETS, SHARED
from bench.output import save
from bench.step_time import ratios, step_seconds
from driver.config import Config, load_config, with_rule
from driver.data.common import DataError
from driver.data.load import load_dataset

VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bf16": {"precision": "bf16"},
    "compile": {"compile": True},
    "bf16_compile": {"precision": "bf16", "compile": True},
}
TARGET_POINTS = 0.3  # bf16's test accuracy within this many points of float32's


def base_config(data: str, args: argparse.Namespace) -> Config:
    budget = BUDGETS["digits"]
    sets = budget.sets(data, args.data_root)
    if data != "digits":
        sets = [s for s in sets if not s.startswith(("train.epochs", "data.train_size"))]
        sets += [f"train.epochs={args.fashion_epochs}", f"data.train_size={args.fashion_train}"]
        sets += [f"data.val_size={args.fashion_val}", "train.batch_size=64"]
    sets += ["train.log_every=1000000", f'train.device="{args.device}"', *args.set]
    return load_config(None, sets)


def variant_config(base: Config, rule: str, variant: str, seed: int) -> Config:
    """`base` trained by `rule` with its own recipe, in `variant`'s precision and compile."""
    cfg = with_rule(base, rule)
    out = f"/tmp/reclra-bench/precision/{rule}-{variant}-{seed}"
    train = replace(cfg.train, seed=seed, out_dir=out, compare=(), **VARIANTS[variant])
    return replace(cfg, train=train, compare={})


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # two runs on two cores beat one run on two threads


def one_run(job: tuple[Config, int]) -> dict[str, Any]:
    """Train `cfg` to the end; its final test accuracy on the first `test_size` test images
    (0: all), evaluated once, at the end."""
    from driver.run.train import train

    cfg, test_size = job
    splits = load_dataset(cfg.data)
    if test_size and test_size < len(splits.test):  # type: ignore[arg-type]
        splits = replace(splits, test=Subset(splits.test, range(test_size)))
    t0 = time.perf_counter()
    log = train(cfg, quiet=True, splits=splits)
    seconds = time.perf_counter() - t0
    print(
        f"{cfg.rule.label:<9} {cfg.train.precision:<8} seed {cfg.train.seed}: test "
        f"{log.test_acc:.4f} ({seconds:.0f} s)",
        flush=True,
    )
    return {"test_acc": log.test_acc, "seconds": seconds}


def run_all(jobs: list[tuple[Config, int]], workers: int) -> list[dict[str, Any]]:
    """Every job, in order; `workers` at a time in fresh one-thread processes."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        return list(pool.map(one_run, jobs))


def measure(data: str, args: argparse.Namespace) -> dict[str, Any]:
    base = base_config(data, args)
    try:
        splits = load_dataset(base.data)
    except DataError as err:
        msg = f"bench.precision: {data} skipped, its data is not here ({err})"
        print(msg, file=sys.stderr, flush=True)
        return {"skipped": msg}
    rules = args.rules.split(",")
    seeds = [int(s) for s in (args.seeds if data == "digits" else args.fashion_seeds).split(",")]
    acc_variants, time_variants = args.accuracy_variants.split(","), args.timing_variants.split(",")
    keys = [(r, v, s) for r in rules for v in acc_variants for s in seeds]
    test_size = 0 if data == "digits" else args.fashion_test
    jobs = [(variant_config(base, r, v, s), test_size) for r, v, s in keys]
    outs = run_all(jobs, args.workers)
    acc: dict[str, dict[str, dict[int, float]]] = {r: {v: {} for v in acc_variants} for r in rules}
    for (r, v, s), out in zip(keys, outs, strict=True):
        acc[r][v][s] = out["test_acc"]
    timed = {
        f"{r}/{v}": variant_config(base, r, v, 0)
        for r in rules
        for v in time_variants
        if data in args.compile_data.split(",") or not VARIANTS[v].get("compile")
    }
    times = step_seconds(  # each first step compiles; then 2 warm-up steps
        timed, rounds=args.timing_rounds, steps=args.timing_steps, warmup=3, start_timeout_s=1800
    )
    key = "per_round" if args.device == "cuda" else "cpu_per_round"
    result: dict[str, Any] = {
        "train_size": len(splits.train),  # type: ignore[arg-type]
        "test_size": min(test_size or len(splits.test), len(splits.test)),  # type: ignore[arg-type]
        "seeds": seeds,
        "rules": {},
    }
    for r in rules:
        per_rule: dict[str, Any] = {"variants": {}}
        timed_here = [v for v in time_variants if f"{r}/{v}" in times]
        rel = ratios({v: times[f"{r}/{v}"] for v in timed_here}, "float32", key)
        for v in acc_variants:
            accs = [acc[r][v][s] for s in seeds]
            entry: dict[str, Any] = {
                "test_acc_per_seed": accs,
                "test_acc_mean": statistics.mean(accs),
            }
            if v != "float32" and "float32" in acc_variants:
                diffs = [100 * (acc[r][v][s] - acc[r]["float32"][s]) for s in seeds]
                entry["diff_points_per_seed"] = diffs
                entry["diff_points_mean"] = statistics.mean(diffs)
                entry["within_target"] = abs(statistics.mean(diffs)) <= TARGET_POINTS
            per_rule["variants"][v] = entry
        for v in timed_here:
            t = times[f"{r}/{v}"]
            entry = per_rule["variants"].setdefault(v, {})
            entry["step_seconds"], entry["cpu_step_seconds"] = (
                t["step_seconds"],
                t["cpu_step_seconds"],
            )
            entry["first_step_seconds"] = t["first_step_seconds"]
            entry["step_ratio_to_float32"] = rel[v]
            if VARIANTS[v].get("compile"):  # the first step compiles: over the eager one's
                eager = {k: x for k, x in VARIANTS[v].items() if k != "compile"}
                plain = next(n for n, x in VARIANTS.items() if x == eager)
                if plain in timed_here:
                    base_first = times[f"{r}/{plain}"]["first_step_seconds"]
                    entry["compile_seconds"] = t["first_step_seconds"] - base_first
        result["rules"][r] = per_rule
    m = base.model
    result["model"] = f"{m.name}-w{m.width}"
    result["epochs"], result["batch_size"] = base.train.epochs, base.train.batch_size
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"device {result['device']}; step ratio: to the rule's float32 "
        f"({'wall' if result['device'] == 'cuda' else 'CPU'} time, one thread on CPU); "
        f"target |bf16 - float32| <= {TARGET_POINTS} points"
    ]
    for data, res in result["datasets"].items():
        if "skipped" in res:
            lines.append(f"{data}: {res['skipped']}")
            continue
        lines.append(
            f"{data}: {res['model']}, {res['train_size']} train / {res['test_size']} test images, "
            f"{res['epochs']} "
            f"epoch(s), batch {res['batch_size']}, seeds {res['seeds']}"
        )
        lines.append(
            f"  {'rule':<10} {'variant':<13} {'test acc':>8} {'diff pts':>9} {'step ms':>8} "
            f"{'ratio':>6} {'compile s':>9}"
        )
        for rule, r in res["rules"].items():
            for v, e in r["variants"].items():
                acc = e.get("test_acc_mean")
                diff = e.get("diff_points_mean")
                step = e.get("step_seconds")
                ratio = e.get("step_ratio_to_float32")
                comp = e.get("compile_seconds")
                lines.append(
                    f"  {rule:<10} {v:<13} {'-' if acc is None else f'{acc:.4f}':>8} "
                    f"{'-' if diff is None else f'{diff:+.2f}':>9} "
                    f"{'-' if step is None else f'{1e3 * step:.1f}':>8} "
                    f"{'-' if ratio is None else f'{ratio:.2f}':>6} "
                    f"{'-' if comp is None else f'{comp:.1f}':>9}"
                )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--data", default="digits,fashion_mnist", help="datasets, comma-separated")
    p.add_argument("--data-root", default=str(SHARED), help="folder holding FashionMNIST/")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rules", default="rec_lra,backprop")
    p.add_argument("--seeds", default="0,1,2", help="digits' seeds")
    p.add_argument("--accuracy-variants", default="float32,bf16", help=f"of {list(VARIANTS)}")
    p.add_argument("--timing-variants", default="float32,bf16,compile", help=f"of {list(VARIANTS)}")
    p.add_argument("--fashion-seeds", default="0,1", help="Fashion-MNIST's seeds")
    p.add_argument("--fashion-train", type=int, default=1000, help="Fashion-MNIST train images")
    p.add_argument("--fashion-epochs", type=int, default=1)
    p.add_argument("--fashion-val", type=int, default=500, help="Fashion-MNIST val images")
    p.add_argument(
        "--fashion-test", type=int, default=2000, help="Fashion-MNIST test images (0: all 10,000)"
    )
    p.add_argument("--timing-rounds", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=3, help="steps per timing round")
    p.add_argument(
        "--compile-data", default="digits", help="datasets whose timing includes compiled variants"
    )
    p.add_argument("--workers", type=int, default=2, help="training runs side by side")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    args = p.parse_args(argv)
    for flag in ("accuracy_variants", "timing_variants"):
        unknown = [v for v in getattr(args, flag).split(",") if v not in VARIANTS]
        if unknown:
            p.error(f"--{flag.replace('_', '-')}: unknown {unknown}; choose from {list(VARIANTS)}")
    if "float32" not in args.timing_variants.split(","):
        p.error("--timing-variants: needs float32 (every ratio is to it)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    # a new, empty inductor cache: every compile measured is cold, as a first run's
    cache = tempfile.mkdtemp(prefix="reclra-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    datasets = {data: measure(data, args) for data in args.data.split(",")}
    result = {
        "device": args.device,
        "rules": args.rules.split(","),
        "datasets": datasets,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "wall_seconds": time.perf_counter() - t0,
    }
    shutil.rmtree(cache, ignore_errors=True)
    print(f"bench.precision: {result['wall_seconds']:.0f} s", flush=True)
    return save(result, args.json, format_table(result))


if __name__ == "__main__":
    main()
