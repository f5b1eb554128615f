"""Calibration of the scaling model's per-call costs: the real pipelines run a width-2 ResNet-8
(almost no compute), and what the simulation cannot see is fitted to them."""

from __future__ import annotations

import statistics

from bench.scaling.predict import (
    CALIBRATED,
    MODEL,
    RULE_SPECS,
    fit,
    pipeline,
    predict,
    schedule_of,
    time_runner,
)
from bench.scaling.profile import config_of, measure_cores, profile_blocks, sample
from driver.pipeline.build import base_spec, block_names
from driver.pipeline.partition import best_partition
from driver.pipeline.stage_count import calls_per_micro_batch


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
        for sched in CALIBRATED:
            run = pipeline(cfg, base, bounds, sched)
            try:
                timed = [time_runner(run, x, y, m, steps) for _ in range(rounds)]
            finally:
                run.close()
            meas[(k, sched)] = statistics.median(v for v, _ in timed)
            drv[(k, sched)] = statistics.median(c for _, c in timed)
            print(
                f"  calibration K={k} {sched}: {meas[(k, sched)]:.1f}/s, "
                f"driver {1e3 * drv[(k, sched)]:.2f} ms CPU per micro-batch",
                flush=True,
            )

    def fits(sched: str, key: str, base: dict) -> list[float]:
        """The link value `key` at which the simulation meets each measured run of `sched`."""
        sync, engine = schedule_of(sched)
        return [
            fit(
                lambda x, k=k: predict(
                    prof,
                    k,
                    {**base, key: x},
                    m,
                    sync=sync,
                    cores=eff,
                    driver=drv[(k, sched)],
                    engine=engine,
                    steps=steps,
                )["samples_per_s"],
                v,
            )
            for (k, s), v in meas.items()
            if s == sched
        ]

    calls = fits("async", "call_s", link)
    call = statistics.median(calls)
    overs = fits("sync", "step_overhead_s", {**link, "call_s": call})
    over = statistics.median(overs)
    p2p = statistics.median(fits("p2p", "p2p_op_s", link))
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
