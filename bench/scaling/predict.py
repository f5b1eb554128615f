"""The scaling model's inputs and predictions for the runs validated here: the ResNet-8 they
time, the real pipelines (stream sync/async, p2p), a profile's stage costs, the predicted
samples/s, and how a run is timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from bench.scaling.profile import BlockProfile
from bench.scaling.sim import RULES, StageCosts, one_process, step_seconds
from driver.config import Config
from driver.pipeline.build import Runner
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.partition import best_partition
from driver.pipeline.stream import RayPipeline
from workers.chain import stage_specs
from workers.spec import StageSpec

MODEL = [
    "model.name=resnet8",
    "model.width=32",
    "data.name=synthetic",
    "data.synthetic_shape=[3, 32, 32]",
    "train.batch_size=32",
    "pipeline.micro_batches=4",
]
RULE_SPECS = {"rec_lra": "rec_lra:topology=skip", "rec_lra_mirror": "rec_lra"}
# the stream engine's two schedules, and the p2p engine's (its sync alone calibrates p2p_op_s)
SCHEDULES = ("sync", "async", "p2p", "p2p_async")
CALIBRATED = ("sync", "async", "p2p")


def schedule_of(sched: str) -> tuple[bool, str]:
    """(sync, engine) of a validation schedule name."""
    return not sched.endswith("async"), "p2p" if sched.startswith("p2p") else "stream"


def pipeline(cfg: Config, base: StageSpec, bounds: Sequence[int], sched: str) -> Runner:
    """A K-stage Ray pipeline of `cfg` cut at `bounds`, one core and thread per stage: the
    stream engine under `sched` ("sync", "async"), or the p2p engine ("p2p", "p2p_async")."""
    sync, engine = schedule_of(sched)
    k = len(bounds) - 1
    gpus = cfg.pipeline.gpus_per_stage
    if base.device.startswith("cuda"):  # a GPU each where there are K, else they share
        gpus = min(1.0, torch.cuda.device_count() / k)
    pc = replace(
        cfg.pipeline,
        stages=k,
        schedule="sync" if sync else "async",
        cpus_per_stage=1.0,
        threads_per_stage=1,
        gpus_per_stage=gpus,
        engine=engine,
    )
    specs = stage_specs(base, list(bounds))
    if engine == "p2p":
        return P2PPipeline(specs, pc)
    return RayPipeline(specs, pc)


def costs_of(
    p: BlockProfile,
    bounds: tuple[int, ...],
    link: dict,
    *,
    sync: bool,
    driver: float = 0.0,
    engine: str = "stream",
) -> StageCosts:
    """Stage costs of profile `p` cut at `bounds`; async learns apply their own update (each
    learn carries one apply of its blocks: apply_every = 1). `driver`: the driver's measured
    CPU seconds per micro-batch. The p2p engine makes no actor call per op: each op costs its
    messages (`p2p_op_s`), and every signal goes by gloo."""
    p2p = engine == "p2p"
    spans = list(zip(bounds, bounds[1:], strict=False))
    learn = [
        sum(p.learn[a:z]) + (0.0 if sync else sum(p.apply[a:z])) for a, z in spans
    ]  # async: an optimizer step per micro-batch
    return StageCosts(
        forward=tuple(sum(p.forward[a:z]) for a, z in spans),
        learn=tuple(learn),
        apply=tuple(sum(p.apply[a:z]) for a, z in spans) if sync else (),
        call=link.get("p2p_op_s", 0.0) if p2p else link["call_s"],
        fused_top=not p2p,
        latency=link["latency_s"],
        bandwidth=link["bandwidth_Bps"],
        # the top stage returns logits and its signal from one call: by the object store
        signal_bandwidth=0.0 if p2p else link.get("object_store_bandwidth_Bps", 0.0),
        hop_cpu=True,  # here hops copy on the same 2 cores that compute
        driver=driver,
        fwd_bytes=tuple(0.0 if a == 0 else p.out_bytes[a - 1] for a, _ in spans),
        signal_bytes=tuple(
            p.signal_bytes[z] if z < len(p.out_bytes) else 0.0 for _, z in spans
        ),  # what the stage above (chained) or the top (broadcast) sends
    )


def median_profile(ps: list[BlockProfile]) -> BlockProfile:
    med = {
        k: [statistics.median(col) for col in zip(*(getattr(p, k) for p in ps), strict=True)]
        for k in ("forward", "learn", "apply")
    }
    return replace(ps[0], forward=med["forward"], learn=med["learn"], apply=med["apply"])


def predict(
    p: BlockProfile,
    k: int,
    link: dict,
    m: int,
    *,
    sync: bool,
    cores: float,
    driver: float = 0.0,
    engine: str = "stream",
    steps: int = 8,
) -> dict:
    """Predicted samples/s of profile `p` at K = k. Async: a stream of `steps` steps from empty
    to drained, as `time_runner` times `steps` steps and a flush (fill and drain included)."""
    batch = m * p.micro_batch
    if k == 1:
        t = one_process(costs_of(p, (0, len(p.forward)), link, sync=True), m)
        return {"step_s": t, "samples_per_s": batch / t, "bounds": [0, len(p.forward)]}
    bounds = best_partition([f + lr for f, lr in zip(p.forward, p.learn, strict=True)], k)
    costs = costs_of(p, bounds, link, sync=sync, driver=driver, engine=engine)
    rule = RULES["rec_lra_mirror" if p.chained else "rec_lra"]
    over = link.get("step_overhead_s", 0.0) if sync and engine == "stream" else 0.0
    t = step_seconds(
        costs, rule, m, sync=sync, cores=cores, steps=steps, step_overhead=over, engine=engine
    )
    return {"step_s": t, "samples_per_s": batch / t, "bounds": list(bounds)}


def time_runner(run, x, y, m: int, steps: int) -> tuple[float, float]:
    """Samples/s of `steps` timed steps after one untimed, and this process's CPU seconds per
    micro-batch meanwhile (with a pipeline: the driver's)."""
    torch.set_num_threads(1)
    run.step(x, y, m)
    run.flush()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        run.step(x, y, m)
    run.flush()
    cpu = (time.process_time() - c0) / (steps * m)
    return steps * len(y) / (time.perf_counter() - t0), cpu


def fit(predicted, measured: float) -> float:
    """The x in [0, 0.1] s at which predicted(x) samples/s (falling in x) meets `measured`."""
    lo, hi = 0.0, 0.1
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) > measured else (lo, mid)
    return lo
