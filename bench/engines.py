"""Benchmark: the two pipeline engines side by side, sync and async, K = 2 and 3.

    python -m bench.engines --json bench/results/engines_cpu.json [--rounds 3 --steps 6]

`stream`: the driver submits every op as an actor call (2K - 1 per micro-batch, plus per-step
stats and applies). `p2p`: each stage runs its whole step in one call and sends to its
neighbours by torch.distributed (gloo here); under async its step calls queue behind each
other (no barrier between steps). For each model: samples/s (median of interleaved
rounds) and the driver's CPU per micro-batch (time.process_time over the timed steps), with
one process (one thread) as the baseline. Models: the scaling model's validation ResNet-8
(width 32: stage compute ~15 ms per micro-batch, where per-call costs show) and a ResNet-18
(width 64, 32x32: ~100 ms per micro-batch).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import ray
import torch

from bench.output import save
from bench.pipeline import MODELS as PIPELINE_MODELS
from bench.scaling.predict import MODEL, pipeline, time_runner
from bench.scaling.profile import config_of, sample
from driver.pipeline.build import base_spec, block_names
from driver.pipeline.partition import plan_partition
from workers.chain import LocalRunner

MODELS = {
    "resnet8_w32": MODEL,
    "resnet18_w64": PIPELINE_MODELS["resnet18_32"],  # bench.pipeline's ResNet-18
}


def compare(
    model: str,
    ks: tuple[int, ...],
    rounds: int,
    steps: int,
    rule: str,
    schedules: list[str],
    device: str = "cpu",
    micro_batches: int = 0,
) -> dict:
    """Every runner on `model`; `micro_batches` > 0: that many micro-batches of the model's
    own micro-batch size (the batch grows with them)."""
    cfg = config_of(MODELS[model], rule, micro_batches)
    cfg = replace(cfg, train=replace(cfg.train, device=device))
    x, y, splits = sample(cfg)
    m = cfg.pipeline.micro_batches
    names = block_names(cfg, splits)
    base = base_spec(cfg, splits, len(names))
    sample_mb = (x[: len(y) // m], y[: len(y) // m])
    runners: dict = {"one_process": LocalRunner([base])}
    for k in ks:
        bounds = plan_partition(base, k, (), sample_mb, 3, names=names).bounds
        for sched in schedules:
            p2p = "p2p" if sched == "sync" else "p2p_async"
            runners[f"k{k}_stream_{sched}"] = pipeline(cfg, base, bounds, sched)
            runners[f"k{k}_p2p_{sched}"] = pipeline(cfg, base, bounds, p2p)
    timed: dict = {name: [] for name in runners}
    try:
        for _ in range(rounds):
            for name, run in runners.items():
                timed[name].append(time_runner(run, x, y, m, steps))
                print(f"  {model} {name:<12} {timed[name][-1][0]:8.1f} samples/s", flush=True)
    finally:
        for run in runners.values():
            run.close()
    out: dict = {"micro_batches": m, "batch": len(y), "rule": rule, "schedules": schedules}
    for name, vals in timed.items():
        out[name] = {
            "samples_per_s": statistics.median(v for v, _ in vals),
            "rounds": [v for v, _ in vals],
            "driver_cpu_ms_per_micro_batch": 1e3 * statistics.median(c for _, c in vals),
        }
    return out


def table(result: dict) -> str:
    lines = []
    for model, r in result["models"].items():
        base = r["one_process"]["samples_per_s"]
        lines.append(f"{model} ({r['rule']}, M = {r['micro_batches']})")
        lines.append("  runner              samples/s   x one process   driver CPU ms / mb")
        for name, v in r.items():
            if isinstance(v, dict):
                lines.append(
                    f"  {name:<18} {v['samples_per_s']:10.1f} {v['samples_per_s'] / base:13.2f}"
                    f" {v['driver_cpu_ms_per_micro_batch']:17.2f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ks", default="2,3")
    p.add_argument("--schedules", default="sync,async")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU per stage, or shared)")
    p.add_argument("--rule", default="rec_lra", help="rec_lra (mirror) or rec_lra:topology=skip")
    p.add_argument(
        "--micro-batches",
        default="0",
        help="micro-batch counts to run, e.g. 4,16 (same micro-batch size; 0: the model's own)",
    )
    args = p.parse_args(argv)
    ray.init(address="local", num_cpus=32, include_dashboard=False)  # our own (logical CPUs)
    result: dict = {"device": args.device, "cores": torch.get_num_threads(), "models": {}}
    try:
        ks = tuple(int(k) for k in args.ks.split(","))
        scheds = args.schedules.split(",")
        for model in args.models.split(","):
            for m in (int(v) for v in args.micro_batches.split(",")):
                result["models"][f"{model}_m{m}" if m else model] = compare(
                    model, ks, args.rounds, args.steps, args.rule, scheds, args.device, m
                )
    finally:
        ray.shutdown()
    return save(result, args.json, table(result))


if __name__ == "__main__":
    main()
