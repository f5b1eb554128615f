"""Benchmark: layer-parallel throughput, one process vs K = 2 Ray stages, side by side.

    python -m bench.pipeline --json results.json [--steps 8 --rounds 2]
    python -m bench.pipeline --json r50.json --models resnet50_64 --skip-time-to-accuracy \
        --skip-accuracy

For each model (by default a ResNet-18 on 32x32 inputs and the digits ResNet; resnet50_64 is
the ImageNet-form ResNet-50 at width 64 on 64x64 inputs; --set changes any key of every
model's config, e.g. --set model.width=8 for a quick look) and rule (rec_lra,
backprop, rec_lra_decoupled, or a variant such as rec_lra:topology=skip): samples/s in one
process with 1 and 2 torch threads, and on K = 2 stages (one core and one thread each) with the
sync and async schedules, on the engine --engine resolves to (auto: p2p); configurations are
interleaved round by round so machine noise hits them alike. Each K = 2 stage's cached bytes
(the most it held between forwards and learns) go under `cached_bytes`.
Then the per-hop transport time of the stage-0 output (object store, zero-copy tensors, Ray
Direct Transport over gloo, Compiled Graph) as a fraction of a stage's compute; the training
time to a fixed test accuracy on digits and Fashion-MNIST of rec-LRA on K = 2 async stages,
against rec-LRA and backprop in one process; and async against sync final accuracy
(bench.pipeline_accuracy), under `accuracy_async_vs_sync`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from bench.budgets import SHARED
from bench.output import save
from bench.pipeline_accuracy import DATA
from bench.pipeline_accuracy import main as accuracy_main
from bench.transport import measure
from driver.config import Config, load_config, with_rule
from driver.data.load import load_dataset, make_loader
from driver.pipeline.build import base_spec, block_names
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.partition import plan_partition
from driver.pipeline.stream import RayPipeline
from driver.run.train import train
from workers.chain import LocalRunner, stage_specs

MODELS = {
    "resnet18_32": [
        "model.name=resnet18",
        "model.width=64",
        "data.name=synthetic",
        "data.synthetic_shape=[3, 32, 32]",
        "train.batch_size=32",
        "pipeline.micro_batches=4",
    ],
    "digits_resnet": ["pipeline.micro_batches=4"],
    "resnet50_64": [
        "model.name=resnet50",
        'model.form="imagenet"',
        "model.width=64",
        "data.name=synthetic",
        "data.synthetic_shape=[3, 64, 64]",
        "train.batch_size=32",
        "pipeline.micro_batches=4",
    ],
}
DEFAULT_MODELS = ("resnet18_32", "digits_resnet")  # resnet50_64 when asked (--models)


def variant(cfg: Config, spec: str) -> Config:
    """`cfg` with the rule of `spec`: a rule name, optionally with rule keys after a colon
    ("rec_lra:topology=skip,beta=0.2"), over that rule's recipe."""
    name, _, keys = spec.partition(":")
    overrides = [f"rule.{kv}" for kv in keys.split(",") if kv]
    c = with_rule(cfg, name)
    if not overrides:
        return c
    rule = load_config(None, [f"rule.name={name}", *overrides]).rule
    return replace(c, rule=rule)


def _configs(cfg: Config, rule: str, device: str, engine: str = "auto") -> dict[str, Config]:
    c = replace(variant(cfg, rule), train=replace(cfg.train, device=device))
    pipe = replace(
        c.pipeline,
        engine=engine,
        stages=2,
        cpus_per_stage=1.0,
        threads_per_stage=1,
        gpus_per_stage=0.25 if device == "cuda" else 0.0,
    )  # 4 actors share it
    return {
        "single_1t": c,
        "single_2t": c,
        "k2_sync": replace(c, pipeline=replace(pipe, schedule="sync")),
        "k2_async": replace(c, pipeline=replace(pipe, schedule="async")),
    }


def throughput(
    cfg: Config, rules: list[str], steps: int, rounds: int, device: str, engine: str = "auto"
) -> tuple[dict, dict]:
    splits = load_dataset(cfg.data)
    batches = list(make_loader(splits.train, cfg.train.batch_size, shuffle=True, seed=0))
    batches = (batches * (steps // max(len(batches), 1) + 1))[:steps]
    m = cfg.pipeline.micro_batches
    results: dict[str, dict[str, list[float]]] = {}
    info: dict = {}
    for rule in rules:
        confs = _configs(cfg, rule, device, engine)
        names = block_names(confs["single_1t"], splits)
        base = base_spec(confs["single_1t"], splits, len(names))
        x0, y0 = batches[0]
        sample = (x0[: len(y0) // m], y0[: len(y0) // m])
        part = plan_partition(replace(base, device=device), 2, (), sample, 3, names=names)
        info[rule] = {
            "partition": list(part.bounds),
            "stage_ms": [1e3 * c for c in part.stage_costs],
            "balance": part.balance,
            "engine": confs["k2_sync"].pipeline.resolved_engine,
        }
        runners = {"single_1t": LocalRunner([base]), "single_2t": LocalRunner([base])}
        for name in ("k2_sync", "k2_async"):
            specs = stage_specs(base_spec(confs[name], splits), list(part.bounds))
            pc = confs[name].pipeline
            runners[name] = (P2PPipeline if pc.resolved_engine == "p2p" else RayPipeline)(specs, pc)
        results[rule] = {name: [] for name in runners}
        try:
            for _ in range(rounds):
                for name, runner in runners.items():
                    torch.set_num_threads(2 if name == "single_2t" else 1)
                    runner.step(*batches[0], m)  # warm up, not timed
                    runner.flush()
                    t0 = time.perf_counter()
                    for x, y in batches:
                        runner.step(x, y, m)
                    runner.flush()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    results[rule][name].append(
                        len(batches) * len(batches[0][1]) / (time.perf_counter() - t0)
                    )
                    print(
                        f"  {rule:<9} {name:<10} {results[rule][name][-1]:8.1f} samples/s",
                        flush=True,
                    )
            for name in ("k2_sync", "k2_async"):
                held: dict[int, int] = {}
                for s, st in runners[name].drain_stats(wait=True):
                    held[s] = max(held.get(s, 0), st.cached_bytes)
                info[rule][f"cached_bytes_{name}"] = [held[s] for s in sorted(held)]
        finally:
            for runner in runners.values():
                runner.close()
    return {r: {n: statistics.median(v) for n, v in d.items()} for r, d in results.items()}, info


def transport(cfg: Config, info: dict, iters: int, timeout_s: float) -> dict:
    """Hop time of stage 0's output for one micro-batch, as a fraction of a stage's compute."""
    splits = load_dataset(cfg.data)
    base = base_spec(cfg, splits)
    from workers.stage import Stage

    cut = info["rec_lra"]["partition"][1]
    stage0 = Stage(replace(base, blocks=(0, cut)))
    mb = cfg.train.batch_size // cfg.pipeline.micro_batches
    shape = tuple(stage0.forward(0, torch.zeros(mb, *splits.input_shape)).shape)
    compute = max(info["rec_lra"]["stage_ms"]) / 1e3
    hops = measure(shape, iters, timeout_s)
    frac = {
        k.removesuffix("_s"): (None if hops.get(k) is None else hops[k] / compute)
        for k in ("actor_calls_s", "zero_copy_s", "gloo_s", "compiled_graph_s")
    }
    default = "gloo" if frac["gloo"] is not None else "actor_calls"  # pipeline.transport auto
    frac["default"], frac["default_transport"] = frac[default], default
    return {"activation_shape": list(shape), "stage_compute_s": compute, **hops, **frac}


TTA = {  # data: (settings, test accuracy to reach)
    "digits": (["train.epochs=10"], 0.95),
    "fashion_mnist": (
        [
            'data.name="fashion_mnist"',
            f"data.root={json.dumps(str(SHARED))}",
            "data.train_size=10000",
            "train.epochs=4",
            "train.batch_size=64",
        ],
        0.85,
    ),
}


def time_to_accuracy(data: str) -> dict:
    """Training seconds until the test accuracy reaches the data's target, per configuration:
    rec-LRA on K = 2 async stages, and rec-LRA and backprop in one process."""
    sets, target = TTA[data]
    base = load_config(
        None,
        [
            *sets,
            "pipeline.micro_batches=4",
            "train.compare=[]",
            f'train.out_dir="/tmp/reclra-bench-tta/{data}"',
        ],
    )
    runs = {
        "rec_lra_k2_async": replace(
            base, pipeline=replace(base.pipeline, stages=2, schedule="async")
        ),
        "rec_lra_decoupled_k2_async": replace(
            with_rule(base, "rec_lra_decoupled"),
            pipeline=replace(base.pipeline, stages=2, schedule="async"),
        ),
        "rec_lra_decoupled_k2_sync": replace(
            with_rule(base, "rec_lra_decoupled"), pipeline=replace(base.pipeline, stages=2)
        ),
        "rec_lra_single_1t": base,
        "rec_lra_single_2t": replace(base, train=replace(base.train, threads=2)),
        "backprop_single_1t": with_rule(base, "backprop"),
        "backprop_single_2t": replace(
            with_rule(base, "backprop"), train=replace(base.train, threads=2)
        ),
    }
    out: dict = {"target": target}
    for name, cfg in runs.items():
        torch.set_num_threads(cfg.train.threads or 1)
        run = train(cfg, quiet=True, track_test=True)
        hit = next((e for e in run.epochs if e["test_acc"] >= target), None)
        out[name] = {
            "seconds": hit["train_seconds"] if hit else None,
            "epoch": hit["epoch"] if hit else None,
            "final_test_acc": run.test_acc,
        }
        print(f"  {data} {name:<20} reached {target:.2f}: {out[name]}", flush=True)
    return out


def _have(data: str) -> bool:
    """Whether `data` is here (Fashion-MNIST is read from ../shared/data, absent on a clone)."""
    if data == "digits":
        return True
    present = (SHARED / "FashionMNIST" / "raw").is_dir()
    if not present:
        print(f"bench.pipeline: {data} skipped: no {SHARED}/FashionMNIST/raw", flush=True)
    return present


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, of {', '.join(MODELS)}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every model (repeatable), e.g. model.width=8",
    )
    p.add_argument(
        "--rules",
        default="rec_lra,backprop,rec_lra_decoupled",
        help="rules, each optionally with rule keys: rec_lra:topology=skip",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda (stages share the GPU)")
    p.add_argument("--engine", default="auto", choices=["auto", "stream", "p2p"])
    p.add_argument("--skip-transport", action="store_true")
    p.add_argument("--skip-time-to-accuracy", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true", help="no async-vs-sync accuracy")
    p.add_argument(
        "--transport-timeout",
        type=float,
        default=120.0,
        help="seconds each transport measurement may take before it counts as stalled",
    )
    args = p.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    # two K = 2 pipelines stay up side by side (only one runs at a time): four CPU slots
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    result: dict = {
        "device": args.device,
        "cores": torch.get_num_threads(),
        "overrides": args.set,
        "models": {},
    }
    try:
        for model in models:
            cfg = load_config(None, [*MODELS[model], "train.compare=[]", *args.set])
            print(f"{model}:", flush=True)
            tp, info = throughput(
                cfg, args.rules.split(","), args.steps, args.rounds, args.device, args.engine
            )
            entry = {**tp, "partition": info}
            if "rec_lra" in info and not args.skip_transport:
                entry["transport_fraction"] = transport(cfg, info, 20, args.transport_timeout)
            result["models"][model] = entry
        if not args.skip_time_to_accuracy:
            result["time_to_accuracy"] = {d: time_to_accuracy(d) for d in TTA if _have(d)}
        if not args.skip_accuracy:
            datas = ",".join(d for d in DATA if _have(d))
            result["accuracy_async_vs_sync"] = accuracy_main(
                ["--json", str(Path(args.json).with_suffix(".accuracy.json")), "--data", datas]
            )
    finally:
        ray.shutdown()
    return save(result, args.json, format_table(result))


def format_table(result: dict) -> str:
    lines = []
    for model, entry in result["models"].items():
        lines.append(f"{model} (samples/s)      single_1t  single_2t    k2_sync   k2_async")
        for rule in entry:
            if rule not in ("partition", "transport_fraction"):
                r = entry[rule]
                lines.append(
                    f"  {rule:<20} "
                    + " ".join(
                        f"{r[k]:10.1f}" for k in ("single_1t", "single_2t", "k2_sync", "k2_async")
                    )
                )
        if "rec_lra" in entry:
            r = entry["rec_lra"]
            best = max(r["single_1t"], r["single_2t"])
            lines.append(f"  rec_lra k2_async / best single: {r['k2_async'] / best:.2f}x")
            if "backprop" in entry:
                lines.append(
                    f"  rec_lra k2_async / backprop k2_async: "
                    f"{r['k2_async'] / entry['backprop']['k2_async']:.2f}x"
                )
        if "rec_lra_decoupled" in entry and "rec_lra" in entry:
            d, r = entry["rec_lra_decoupled"], entry["rec_lra"]
            best = max(r["single_1t"], r["single_2t"], d["single_1t"], d["single_2t"])
            lines.append(
                f"  decoupled k2_sync / chained k2_sync: {d['k2_sync'] / r['k2_sync']:.2f}x"
            )
            lines.append(f"  decoupled k2_async / best single: {d['k2_async'] / best:.2f}x")
            for rule in ("rec_lra", "rec_lra_decoupled"):
                held = entry["partition"][rule]["cached_bytes_k2_async"]
                lines.append(f"  {rule} k2_async cached MB per stage: {[b / 1e6 for b in held]}")
        tf = entry.get("transport_fraction")
        if tf:
            cg = tf["compiled_graph"]
            lines.append(
                f"  transport per hop / stage compute: actor calls "
                f"{tf['actor_calls']:.3f}, compiled graph "
                f"{'n/a' if cg is None else f'{cg:.3f}'}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
