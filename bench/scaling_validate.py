"""Validation of the scaling model against runs measured here: the real pipeline (RayPipeline,
as bench.pipeline runs it) at K = 2 and 3, sync and async, and one process (K = 1, one thread),
interleaved round by round with a fresh block profile each round, against the simulation fed
that profile and the measured link."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from bench.scaling_profile import BlockProfile, config_of, measure_cores, profile_blocks, sample
from bench.scaling_sim import RULES, StageCosts, calls_per_micro_batch, one_process, step_seconds
from driver.config import Config
from driver.pipeline.build import Runner, base_spec, block_names
from driver.pipeline.p2p import P2PPipeline
from driver.pipeline.partition import best_partition
from driver.pipeline.stream import RayPipeline
from workers.chain import LocalRunner, stage_specs
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
SCHEDULES = ("sync", "async", "p2p")  # the stream engine's two schedules, and the p2p engine


def pipeline(cfg: Config, base: StageSpec, bounds: Sequence[int], sched: str) -> Runner:
    """A K-stage Ray pipeline of `cfg` cut at `bounds`, one core and thread per stage: the
    stream engine under `sched` ("sync", "async"), or the p2p engine ("p2p", sync)."""
    pc = replace(
        cfg.pipeline,
        stages=len(bounds) - 1,
        schedule="async" if sched == "async" else "sync",
        cpus_per_stage=1.0,
        threads_per_stage=1,
    )
    specs = stage_specs(base, list(bounds))
    if sched == "p2p":
        return P2PPipeline(specs, replace(pc, engine="p2p"))
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
) -> dict:
    batch = m * p.micro_batch
    if k == 1:
        t = one_process(costs_of(p, (0, len(p.forward)), link, sync=True), m)
        return {"step_s": t, "samples_per_s": batch / t, "bounds": [0, len(p.forward)]}
    bounds = best_partition([f + lr for f, lr in zip(p.forward, p.learn, strict=True)], k)
    costs = costs_of(p, bounds, link, sync=sync, driver=driver, engine=engine)
    rule = RULES["rec_lra_mirror" if p.chained else "rec_lra"]
    over = link.get("step_overhead_s", 0.0) if sync and engine == "stream" else 0.0
    t = step_seconds(costs, rule, m, sync=sync, cores=cores, steps=8, step_overhead=over)
    return {"step_s": t, "samples_per_s": batch / t, "bounds": list(bounds)}


def _time_runner(run, x, y, m: int, steps: int) -> tuple[float, float]:
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


def _fit(predicted, measured: float) -> float:
    """The x in [0, 0.1] s at which predicted(x) samples/s (falling in x) meets `measured`."""
    lo, hi = 0.0, 0.1
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) > measured else (lo, mid)
    return lo


def calibrate_call(link: dict, *, ks: tuple[int, ...], rounds: int, steps: int, cores: float):
    """The real pipeline's own costs (its actor calls, gloo transfers, stats, the driver and the
    Ray processes' CPU): run it with a width-2 ResNet-8 (compute ~nothing) at each K, sync and
    async; fit the simulation's call cost to the async runs (median over K), then a per-step
    overhead (the flush: the driver's gathers and the stages' stats) to the sync runs. The
    driver's own CPU per micro-batch is measured in each run and simulated as its own process
    (it shares the cores), so the fits are what remains: the stages' side of each call."""
    cfg = config_of([*MODEL, "model.width=2"], RULE_SPECS["rec_lra"])
    x, y, splits = sample(cfg)
    m = cfg.pipeline.micro_batches
    base = base_spec(cfg, splits, len(block_names(cfg, splits)))
    prof = profile_blocks(cfg, reps=3)
    eff = measure_cores(200, int(cores))
    meas: dict = {}
    drv: dict = {}
    for k in (k for k in ks if k > 1):
        bounds = best_partition([f + lr for f, lr in zip(prof.forward, prof.learn, strict=True)], k)
        for sched in SCHEDULES:
            run = pipeline(cfg, base, bounds, sched)
            try:
                timed = [_time_runner(run, x, y, m, steps) for _ in range(rounds)]
            finally:
                run.close()
            meas[(k, sched)] = statistics.median(v for v, _ in timed)
            drv[(k, sched)] = statistics.median(c for _, c in timed)
            print(
                f"  calibration K={k} {sched}: {meas[(k, sched)]:.1f}/s, "
                f"driver {1e3 * drv[(k, sched)]:.2f} ms CPU per micro-batch",
                flush=True,
            )
    calls = [
        _fit(
            lambda c, k=k: predict(
                prof, k, {**link, "call_s": c}, m, sync=False, cores=eff, driver=drv[(k, "async")]
            )["samples_per_s"],
            v,
        )
        for (k, sched), v in meas.items()
        if sched == "async"
    ]
    call = statistics.median(calls)
    overs = [
        _fit(
            lambda o, k=k: predict(
                prof,
                k,
                {**link, "call_s": call, "step_overhead_s": o},
                m,
                sync=True,
                cores=eff,
                driver=drv[(k, "sync")],
            )["samples_per_s"],
            v,
        )
        for (k, sched), v in meas.items()
        if sched == "sync"
    ]
    over = statistics.median(overs)
    p2p = statistics.median(
        _fit(
            lambda c, k=k: predict(
                prof,
                k,
                {**link, "p2p_op_s": c},
                m,
                sync=True,
                cores=eff,
                driver=drv[(k, "p2p")],
                engine="p2p",
            )["samples_per_s"],
            v,
        )
        for (k, sched), v in meas.items()
        if sched == "p2p"
    )
    print(
        f"  calibrated: call {1e3 * call:.2f} ms, sync step overhead {1e3 * over:.2f} ms, "
        f"p2p op {1e3 * p2p:.2f} ms"
    )
    runs = {
        "effective_cores": eff,
        "measured_samples_per_s": {f"{k}_{s}": v for (k, s), v in meas.items()},
        "driver_cpu_per_micro_batch_s": {f"{k}_{s}": v for (k, s), v in drv.items()},
        "driver_s_per_call": statistics.median(
            v / calls_per_micro_batch(k, m, sync=sched == "sync")
            for (k, sched), v in drv.items()
            if sched != "p2p"
        ),
        "driver_s_per_p2p_call": statistics.median(
            v / calls_per_micro_batch(k, m, sync=True, engine="p2p")
            for (k, sched), v in drv.items()
            if sched == "p2p"
        ),
        "fitted_p2p_op_s": p2p,
        "call_fits_s": calls,
        "step_overhead_fits_s": overs,
    }
    return call, over, p2p, runs


def validate(link: dict, *, ks: tuple[int, ...], rounds: int, steps: int, cores: float) -> dict:
    """validation[rule][K][schedule] = measured (median of rounds) and predicted samples/s."""
    call, over, p2p, runs = calibrate_call(link, ks=ks, rounds=rounds, steps=steps, cores=cores)
    out: dict = {
        "calibration": {
            "fitted_call_s": call,
            "fitted_step_overhead_s": over,
            "ping_call_s": link["call_s"],
            **runs,
        }
    }
    ping, link = link, {**link, "call_s": call, "step_overhead_s": over, "p2p_op_s": p2p}
    for key, spec in RULE_SPECS.items():
        cfg = config_of(MODEL, spec)
        x, y, splits = sample(cfg)
        m = cfg.pipeline.micro_batches
        names = block_names(cfg, splits)
        base = base_spec(cfg, splits, len(names))
        first = profile_blocks(cfg, reps=3)
        runners: dict = {(1, "sync"): LocalRunner([base])}
        for k in ks:
            if k == 1:
                continue
            bounds = best_partition(
                [f + lr for f, lr in zip(first.forward, first.learn, strict=True)], k
            )
            for sched in SCHEDULES:
                runners[(k, sched)] = pipeline(cfg, base, bounds, sched)
        measured: dict = {name: [] for name in runners}
        profiles = [first]
        cores_seen = []
        try:
            for _ in range(rounds):
                cores_seen.append(measure_cores(200, int(cores)))
                print(f"  effective cores now: {cores_seen[-1]:.2f}", flush=True)
                for name, run in runners.items():
                    measured[name].append(_time_runner(run, x, y, m, steps))
                    print(f"  {key:<15} K={name[0]} {name[1]:<5} {measured[name][-1][0]:7.1f}/s")
                profiles.append(profile_blocks(cfg, reps=3))
        finally:
            for run in runners.values():
                run.close()
        prof = median_profile(profiles)
        # the machine is shared: calibrate compute speed by the one-process runs of the same
        # rounds (K = 1 then matches by construction), and cores by measure_cores
        k1 = statistics.median(v for v, _ in measured[(1, "sync")])
        scale = predict(prof, 1, link, m, sync=True, cores=cores)["samples_per_s"] / k1
        calib = replace(
            prof,
            forward=[scale * v for v in prof.forward],
            learn=[scale * v for v in prof.learn],
            apply=[scale * v for v in prof.apply],
        )
        eff = statistics.median(cores_seen)
        res: dict = {
            "profile_ms": _ms(prof),
            "micro_batches": m,
            "compute_scale_from_k1": scale,
            "effective_cores_rounds": cores_seen,
            "effective_cores": eff,
            "nominal_cores": cores,
        }
        for (k, sched), timed in measured.items():
            samples = [v for v, _ in timed]
            driver = statistics.median(c for _, c in timed) if k > 1 else 0.0
            sync, engine = sched != "async", "p2p" if sched == "p2p" else "stream"
            pred = predict(calib, k, link, m, sync=sync, cores=eff, driver=driver, engine=engine)
            raw = predict(prof, k, ping, m, sync=sync, cores=cores, engine=engine)
            meas = statistics.median(samples)
            res.setdefault(str(k), {})[sched] = {
                "measured_samples_per_s": meas,
                "measured_rounds": samples,
                "driver_cpu_per_micro_batch_s": driver,
                "predicted_samples_per_s": pred["samples_per_s"],
                "relative_error": (pred["samples_per_s"] - meas) / meas,
                "predicted_raw_samples_per_s": raw["samples_per_s"],
                "relative_error_raw": (raw["samples_per_s"] - meas) / meas,
                "bounds": pred["bounds"],
            }
        out[key] = res
    return out


def _ms(p: BlockProfile) -> dict:
    return {
        "blocks": list(p.names),
        "forward": [1e3 * v for v in p.forward],
        "learn": [1e3 * v for v in p.learn],
        "apply": [1e3 * v for v in p.apply],
        "out_bytes": p.out_bytes,
        "signal_bytes": p.signal_bytes,
        "micro_batch": p.micro_batch,
    }
