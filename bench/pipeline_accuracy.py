"""Async against sync: final test accuracy of K-stage pipelines, several seeds, side by side.

    python -m bench.pipeline_accuracy --json results.json [--data digits,fashion_mnist]

Runs the pipeline's own stream in process (pipeline.backend = "local"), which performs the
same ops in the same order per stage as the Ray actors, so the numbers are the Ray pipeline's
(tests/test_pipeline_local.py checks this bit for bit) without two cores' worth of Ray
overhead. Runs go two at a time in one-thread processes. Fashion-MNIST is read in place from
../shared/data and skipped, saying so, where it is absent. bench.pipeline adds the result to
its JSON under `accuracy_async_vs_sync`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from bench.accuracy_runs import run_all
from bench.budgets import SHARED
from bench.output import save
from driver.config import Config, load_config
from driver.data.common import DataError
from driver.data.load import load_dataset

# per dataset: the settings every run shares (ResNet-8 width 16, batch 32, 4 micro-batches)
DATA = {
    "digits": ["train.epochs=6", "train.batch_size=32"],
    "fashion_mnist": [
        'data.name="fashion_mnist"',
        "data.train_size=10000",
        "train.epochs=3",
        "train.batch_size=64",
    ],
}


def configs(data: str, ks: list[int], seeds: list[int], root: str, sets: list[str]) -> list:
    """(k, schedule, seed, Config) for every run."""
    out = []
    extra = [f"data.root={json.dumps(root)}"] if data != "digits" else []
    for k in ks:
        for schedule in ("sync", "async"):
            for seed in seeds:
                cfg = load_config(
                    None,
                    [
                        *DATA[data],
                        *extra,
                        "train.compare=[]",
                        "train.log_every=1000000",
                        f"train.seed={seed}",
                        f'train.out_dir="/tmp/reclra-bench-async/{data}-{k}-{schedule}-{seed}"',
                        'pipeline.backend="local"',
                        f"pipeline.stages={k}",
                        f'pipeline.schedule="{schedule}"',
                        "pipeline.micro_batches=4",
                        *sets,
                    ],
                )
                out.append((k, schedule, seed, cfg))
    return out


def async_vs_sync(
    data: str, ks: list[int], seeds: list[int], root: str, workers: int, sets: list[str]
) -> dict:
    """Per K: mean test accuracy of sync and async over `seeds`, and async minus sync."""
    runs = configs(data, ks, seeds, root, sets)
    cfgs: list[Config] = [c for *_, c in runs]
    results = run_all(cfgs, workers)
    out: dict = {"settings": DATA[data] + sets, "seeds": seeds}
    for k in ks:
        acc = {
            sched: [
                r["test_acc"]
                for (kk, s, _, _), r in zip(runs, results, strict=True)
                if (kk, s) == (k, sched)
            ]
            for sched in ("sync", "async")
        }
        mean = {s: statistics.mean(v) for s, v in acc.items()}
        out[str(k)] = {
            "sync": mean["sync"],
            "async": mean["async"],
            "sync_per_seed": acc["sync"],
            "async_per_seed": acc["async"],
            "async_minus_sync_points": 100 * (mean["async"] - mean["sync"]),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--data", default="digits,fashion_mnist")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", default=str(SHARED))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="section.key=value, repeatable")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.stages.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict = {}
    for data in args.data.split(","):
        if data != "digits":
            try:
                load_dataset(
                    load_config(None, [*DATA[data], f"data.root={json.dumps(args.data_root)}"]).data
                )
            except DataError as err:
                result[data] = {"skipped": f"the {data} data is not here ({err})"}
                print(f"bench.pipeline_accuracy: {data} skipped: {err}", file=sys.stderr)
                continue
        result[data] = async_vs_sync(data, ks, seeds, args.data_root, args.workers, args.set)
        for k in ks:
            r = result[data][str(k)]
            print(
                f"{data} K={k}: sync {r['sync']:.4f} async {r['async']:.4f} "
                f"({r['async_minus_sync_points']:+.2f} points)",
                flush=True,
            )
    return save(result, args.json)


if __name__ == "__main__":
    main()
