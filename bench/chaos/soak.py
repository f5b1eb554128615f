"""Chaos soak: one K-stage sync run on a real local Ray cluster survives seeded faults.

    python -m bench.chaos --json bench/results/chaos_cpu.json

While a thread steps the run's Controller (as the service does), this thread injects, at
seeded random steps: SIGKILL of a random stage's worker process (5 times), SIGSTOP of one past
pipeline.step_timeout_s (continued once the run gave up on it), and a checkpoint location that
runs out of space for one write (bench/chaos/faults.py). Per fault it measures the recovery
seconds (injected -> the run trains past the step where it was; ENOSPC: from the failed write)
and the steps replayed. Then it compares the final weights with an uninterrupted run's: sync
and float64, so a run that lost nothing ends bitwise equal. `steps_lost` is the expected step
count minus the steps the run ended with (0: nothing skipped, nothing left untrained).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray

from bench.chaos.faults import (
    FullStore,
    SmallDisk,
    Stopped,
    actor_pid,
    alive,
    names,
    signal_worker,
)
from bench.chaos.plan import Fault, Watch, chaos_config, compare_states, make_plan, table
from bench.output import save
from driver.config import Config
from driver.data.common import DatasetSplits
from driver.data.load import load_dataset
from driver.run import checkpoint_store
from driver.run.controller import Controller, RunFailed, RunState


def _wait(cond, timeout_s: float, poll_s: float = 0.005) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _inject(
    ctl: Controller,
    f: Fault,
    watch: Watch,
    disk: SmallDisk | FullStore,
    stopped: Stopped,
    every: int,
    timeout_s: float,
    signalled: list[int],
) -> None:
    """Inject `f` into the running run and wait until it recovered (or clearly did not)."""
    if f.kind == "enospc":
        seen, step0 = len(watch.enospc), ctl.run.steps
        disk.fill()
        failed = _wait(lambda: len(watch.enospc) > seen or ctl.done, 4 * every * timeout_s)
        disk.free()  # space comes back, as when an operator clears the disk
        if not failed or len(watch.enospc) == seen:
            f.note = f"no failed write seen (filled at step {step0}); run {ctl.state}"
            return
        t0, f.step, message = watch.enospc[seen]
        f.note = f"disk filled at step {step0}; {message}"
        _wait(lambda: ctl.run.steps > f.step or ctl.done, 120)
        f.recovered = ctl.run.steps > f.step and ctl.state is not RunState.FAILED
        if f.recovered:
            f.seconds = time.perf_counter() - t0
        # recovered also means: the location takes checkpoints again once it has space
        _wait(lambda: any(s > f.step for _, s in watch.written) or ctl.done, 300)
        later = [s for _, s in watch.written if s > f.step]
        f.recovered = f.recovered and bool(later)
        f.note += f"; next good checkpoint: step {later[0]}" if later else "; none after"
        return
    runner = ctl.runner
    if runner is None:
        f.note = f"not injected: no stages ({ctl.state})"
        return
    pid = actor_pid(runner.group.actors[f.stage])  # type: ignore[attr-defined]
    r0, n0, f.step = ctl.restarts, len(watch.restored), ctl.run.steps
    t0 = time.perf_counter()
    signalled.append(pid)
    if f.kind == "kill":
        signal_worker(pid, signal.SIGKILL)
    else:
        stopped.stop(pid)
        _wait(lambda: ctl.restarts > r0 or ctl.state is RunState.RECOVERING or ctl.done, 600)
        lingering = stopped.release()
        f.note = f"pid {pid} killed after SIGCONT" if lingering else ""
    f.recovered = _wait(lambda: ctl.restarts > r0 and ctl.run.steps > f.step or ctl.done, 600)
    f.recovered = f.recovered and ctl.restarts > r0 and ctl.run.steps > f.step
    if f.recovered:
        f.seconds = time.perf_counter() - t0
    f.restarts = ctl.restarts - r0
    if len(watch.restored) > n0:
        f.restored_to = watch.restored[n0]
        f.steps_replayed = f.step - f.restored_to
    if not f.recovered:
        f.note = (f.note + f" run {ctl.state}: {ctl.error}").strip()


def _start(make: Callable[[], Controller], tries: int = 3) -> tuple[Controller, int]:
    """The run stepped to RUNNING (its first start and checkpoint) before any fault. A busy
    machine can start the actors past the step deadline, which fails a run that has no
    checkpoint yet: the run is then made again (counted in `start_attempts`)."""
    for attempt in range(1, tries + 1):
        ctl = make()
        while ctl.state is not RunState.RUNNING and not ctl.done:
            ctl.step()
        if not ctl.done:
            return ctl, attempt
        logging.warning("chaos: the run did not start (%s); making it again", ctl.error)
    raise RuntimeError(f"chaos: the run did not start in {tries} attempts: {ctl.error}")


def soak(
    cfg: Config, splits: DatasetSplits, plan: list[Fault], work: Path, store: str = "tmpfs"
) -> dict[str, Any]:
    """The reference run, then the same run under `plan`'s faults; their figures. `store`:
    where the checkpoints run out of space, a "tmpfs" (if it can be mounted) or "fsspec"."""
    t_start, load = time.perf_counter(), os.getloadavg()
    # the same run, uninterrupted (its deadline at the default: starts may be slow here)
    ref_cfg = replace(cfg, pipeline=replace(cfg.pipeline, step_timeout_s=300.0))
    ref = Controller(ref_cfg, out_dir=work / "ref", splits=splits, callbacks=[])
    ref.run_to_end()
    ref_state = checkpoint_store.load(ref.ckpt_dir)["runner"]
    t_ref = time.perf_counter() - t_start
    watch = Watch()
    out: str | Path = work / "chaos"
    disk: SmallDisk | FullStore | None = None
    if store != "fsspec":  # a real filesystem that runs out of space: a small tmpfs
        try:
            disk = SmallDisk(work / "chaos" / cfg.rule.label / "checkpoints", 32 << 20)
        except (OSError, subprocess.CalledProcessError) as exc:
            logging.warning("chaos: cannot mount a tmpfs (%s); using an fsspec store", exc)
    if disk is None:
        disk = FullStore()
        out = f"{disk.protocol}://{work.name}/chaos"
    root = logging.getLogger()
    root.addHandler(watch)
    signalled: list[int] = []  # worker processes killed or stopped: all must be gone at the end
    driver: threading.Thread | None = None
    t0 = time.perf_counter()
    every, timeout_s = cfg.train.checkpoint_every, cfg.pipeline.step_timeout_s
    try:
        ctl, starts = _start(lambda: Controller(cfg, out_dir=out, splits=splits, callbacks=[watch]))
        watch.ctl = ctl

        def drive() -> None:
            with contextlib.suppress(RunFailed):  # the run's error stays in ctl.error
                ctl.run_to_end()

        driver = threading.Thread(target=drive, name="chaos-run", daemon=True)
        with Stopped() as stopped:
            driver.start()
            for f in plan:
                _wait(
                    lambda f=f: (
                        ctl.done or (ctl.state is RunState.RUNNING and ctl.run.steps >= f.at_step)
                    ),
                    3600,
                )
                if ctl.done:
                    f.note = f"not injected: the run ended {ctl.state}"
                    continue
                _inject(ctl, f, watch, disk, stopped, every, timeout_s, signalled)
                print(
                    f"  {f.kind:6s} stage {f.stage:2d} step {f.step:3d}: "
                    f"{'recovered' if f.recovered else 'NOT recovered'} {f.note}",
                    flush=True,
                )
            driver.join()
        chaos_s = time.perf_counter() - t0
        last_good: dict[str, Any] = {}
        try:
            state = checkpoint_store.load(ctl.ckpt_dir)
            last_good = {"ok": True, "steps": state["runlog"]["steps"]}
            equal, diff = compare_states(ref_state, state["runner"])
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            last_good = {"ok": False, "error": str(exc)}
            equal, diff = False, float("inf")
        leftovers = [n for n in names(ctl.ckpt_dir) if ".tmp" in n]
    finally:
        root.removeHandler(watch)
        if driver is not None and driver.is_alive():
            ctl.request_stop()
            driver.join(120)
        disk.close()
    _wait(lambda: not any(alive(p) for p in signalled), 30, 0.1)
    left_alive = [p for p in signalled if alive(p)]
    injected = [f for f in plan if f.step >= 0]
    secs = [f.seconds for f in plan if f.seconds is not None]
    expected = ref.run.steps
    return {
        "stages": cfg.pipeline.stages,
        "checkpoint_every": every,
        "step_timeout_s": timeout_s,
        "transport": cfg.pipeline.transport,
        "start_attempts": starts,
        "enospc_method": "tmpfs" if isinstance(disk, SmallDisk) else "fsspec",
        "faults_injected": len(injected),
        "faults_survived": sum(f.recovered for f in plan),
        "steps_lost": expected - ctl.run.steps,
        "steps_replayed": sum(f.steps_replayed for f in plan),
        "recovery_seconds": secs,
        "recovery_seconds_median": statistics.median(secs) if secs else None,
        "recovery_seconds_max": max(secs) if secs else None,
        "recovery_seconds_by_kind": {
            k: [f.seconds for f in plan if f.kind == k and f.seconds is not None]
            for k in sorted({f.kind for f in plan})
        },
        "final_state": str(ctl.state),
        "final_steps": ctl.run.steps,
        "expected_steps": expected,
        "weights_equal": equal,
        "max_abs_diff": diff,
        "restarts": ctl.restarts,
        "unplanned_restarts": ctl.restarts - sum(f.restored_to >= 0 for f in plan),
        "checkpoint_write_failures": getattr(
            getattr(ctl, "checkpoints", None), "failed", len(watch.enospc)
        ),
        "error": ctl.error if ctl.state is RunState.FAILED else None,
        "last_good_checkpoint": last_good,
        "leftover_tmp_files": leftovers,
        "left_alive": left_alive,
        "faults": [asdict(f) for f in plan],
        "reference_seconds": t_ref,
        "chaos_seconds": chaos_s,
        "wall_seconds": time.perf_counter() - t_start,
        "load_average_before_after": [load[0], os.getloadavg()[0]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--stages", type=int, choices=(2, 3), default=3)
    p.add_argument("--epochs", type=int, default=4, help="digits epochs (19 steps each)")
    p.add_argument("--checkpoint-every", type=int, default=4)
    p.add_argument("--step-timeout", type=float, default=10.0, help="pipeline.step_timeout_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transport", default="auto", help="pipeline.transport")
    p.add_argument("--store", choices=("tmpfs", "fsspec"), default="tmpfs", help="for ENOSPC")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = chaos_config(
        args.stages, args.epochs, args.checkpoint_every, args.step_timeout, args.transport
    )
    splits = load_dataset(cfg.data)
    n = len(splits.train)  # type: ignore[arg-type]
    total = args.epochs * -(-n // cfg.train.batch_size)
    plan = make_plan(args.seed, args.stages, total, args.checkpoint_every + 2)
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="reclra-chaos")
    try:
        result = soak(cfg, splits, plan, Path(tempfile.mkdtemp(prefix="reclra-chaos-")), args.store)
    finally:
        ray.shutdown()
    result["seed"] = args.seed
    return save(result, args.json, table(result))


if __name__ == "__main__":
    main()
