"""Validation of the scaling model against runs measured here: the real pipelines (the stream
engine sync and async, the p2p engine) at K = 2 and 3, and one process (K = 1, one thread),
interleaved round by round with a fresh block profile each round, against the simulation fed
that profile and the measured link."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace

from bench.scaling.calibrate import calibrate_call
from bench.scaling.predict import (
    MODEL,
    RULE_SPECS,
    SCHEDULES,
    median_profile,
    pipeline,
    predict,
    schedule_of,
    time_runner,
)
from bench.scaling.profile import BlockProfile, config_of, measure_cores, profile_blocks, sample
from driver.pipeline.build import base_spec, block_names
from driver.pipeline.partition import best_partition
from workers.chain import LocalRunner


def validate(
    link: dict,
    *,
    ks: tuple[int, ...],
    rounds: int,
    steps: int,
    cores: float,
    more_micro_batches: tuple[int, ...] = (),
) -> dict:
    """validation[rule][K][schedule] = measured (median of rounds) and predicted samples/s.
    `more_micro_batches`: also validate at these micro-batch counts (micro-batches of the same
    size), under validation["<rule>_m<M>"], with the per-call costs calibrated at the model's
    own count: a check of how the model carries to other M, not a fit."""
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
    for mm, (rule, spec) in itertools.product((0, *more_micro_batches), RULE_SPECS.items()):
        key = f"{rule}_m{mm}" if mm else rule
        cfg = config_of(MODEL, spec, mm)
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
                    measured[name].append(time_runner(run, x, y, m, steps))
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
            sync, engine = schedule_of(sched)
            pred = predict(
                calib, k, link, m, sync=sync, cores=eff, driver=driver, engine=engine, steps=steps
            )
            raw = predict(prof, k, ping, m, sync=sync, cores=cores, engine=engine, steps=steps)
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
