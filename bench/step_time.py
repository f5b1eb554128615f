"""Step time of several configs, each in a process of its own, timed in alternating rounds.

Each config trains in its own spawned process, as a real run would: its own allocator, caches
and thread pool, so one model's memory traffic does not slow the other's (two models stepped
in turn inside one process do interfere: on ResNet-18 the larger working set lost 10-15% that
way). The processes take turns: the parent asks one for `steps` steps at a time, round-robin,
so machine noise still hits every config alike. Only one process computes at any moment.
Ratios are medians over rounds of within-round ratios, of CPU time by default (a busy
neighbour inflates wall time by up to 1.5x a round here, CPU time much less); wall-time
ratios are reported beside them.

    python -m bench.step_time --rules rec_lra,backprop,kp --model resnet18 --width 32
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import statistics
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.output import save
from driver.config import Config


def _worker(cfg: Config, input_shape: tuple[int, ...] | None, batch: int, conn: Connection) -> None:
    from driver.data.load import load_dataset, make_loader
    from driver.pipeline.build import base_spec
    from workers.chain import LocalRunner

    torch.set_num_threads(1)
    splits = load_dataset(cfg.data)
    x, y = next(iter(make_loader(splits.train, batch, shuffle=True, seed=0)))
    spec = base_spec(cfg, splits)
    if input_shape is not None and input_shape != tuple(x.shape[1:]):  # e.g. 28x28 data at 32x32
        x = torch.nn.functional.interpolate(x, size=input_shape[1:])
        spec = replace(spec, input_shape=input_shape)
    runner = LocalRunner([spec])
    t0 = time.perf_counter()
    runner.step(x, y)  # the first step: kernels' first calls, a compiled stage's compile
    conn.send(time.perf_counter() - t0)
    while True:
        steps = conn.recv()
        if steps is None:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            runner.step(x, y)
        conn.send((time.perf_counter() - t0, time.process_time() - c0))


def step_seconds(
    cfgs: dict[str, Config],
    *,
    rounds: int = 5,
    steps: int = 5,
    warmup: int = 3,
    batch: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    start_timeout_s: float = 600,
) -> dict[str, dict[str, Any]]:
    """Per config: seconds per step (mean over `rounds` rounds of `steps` steps, after
    `warmup` steps, the first included), the per-round times, and the first step's seconds
    (a compiled stage compiles in it). One thread each, one process each, started one after
    another (so first steps never overlap), timed in alternating rounds."""
    ctx = mp.get_context("spawn")
    procs, conns, first = {}, {}, {}
    try:
        for name, cfg in cfgs.items():
            parent, child = ctx.Pipe()
            size = batch or cfg.train.batch_size
            p = ctx.Process(target=_worker, args=(cfg, input_shape, size, child), daemon=True)
            p.start()
            procs[name], conns[name] = p, parent
            if not parent.poll(start_timeout_s):
                raise RuntimeError(
                    f"bench.step_time: the {name} process did not take its first step in "
                    f"{start_timeout_s:g} s"
                )
            first[name] = parent.recv()
            parent.send(max(warmup - 1, 0))
            parent.recv()
        per_round: dict[str, list[float]] = {name: [] for name in cfgs}
        cpu_round: dict[str, list[float]] = {name: [] for name in cfgs}
        for _ in range(rounds):
            for name, conn in conns.items():  # one at a time: the others wait
                conn.send(steps)
                wall, cpu = conn.recv()
                per_round[name].append(wall / steps)
                cpu_round[name].append(cpu / steps)
        return {
            name: {
                "step_seconds": statistics.mean(ts),
                "per_round": ts,
                "cpu_step_seconds": statistics.mean(cpu_round[name]),
                "cpu_per_round": cpu_round[name],
                "first_step_seconds": first[name],
            }
            for name, ts in per_round.items()
        }
    finally:
        for conn in conns.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for p in procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()


def ratios(
    times: dict[str, dict[str, Any]], ref: str, key: str = "cpu_per_round"
) -> dict[str, float]:
    """Each config's step time over `ref`'s: the median over rounds of the ratio within a
    round (the configs of one round ran back to back, so a noisy round cancels out). By default
    the CPU time of the stepping process (one thread), which a neighbour on a shared machine
    does not inflate the way it inflates wall time; `key="per_round"` gives wall time."""
    base = times[ref][key]
    return {
        name: statistics.median(a / b for a, b in zip(t[key], base, strict=True))
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    from driver.config import load_config, with_rule

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rules", default="rec_lra,backprop")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--size", type=int, default=0, help="resize images to size x size (0: as is)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="section.key=value for every rule")
    p.add_argument("--json", default="", help="also write the times and ratios here")
    args = p.parse_args(argv)
    sets = [f'data.name="{args.data}"', "data.train_size=2000"] if args.data != "digits" else []
    if args.data != "digits":
        sets.append(f'data.root="{args.data_root}"')
    sets += [f'model.name="{args.model}"', f"model.width={args.width}", *args.set]
    sets.append(f"train.batch_size={args.batch}")
    base = load_config(None, sets)
    names = args.rules.split(",")
    cfgs = {name: with_rule(base, name) for name in names}
    shape = None
    if args.size:
        from driver.data.load import load_dataset

        shape = (load_dataset(base.data).input_shape[0], args.size, args.size)
    times = step_seconds(cfgs, rounds=args.rounds, steps=args.steps, input_shape=shape)
    ref = "backprop" if "backprop" in times else names[0]
    wall, cpu = ratios(times, ref, "per_round"), ratios(times, ref)
    lines = []
    for name, t in times.items():
        t["wall_ratio"], t["cpu_ratio"] = wall[name], cpu[name]
        lines.append(
            f"{name:<12} {1e3 * t['step_seconds']:8.1f} ms/step wall, {wall[name]:.3f}x {ref}; "
            f"{1e3 * t['cpu_step_seconds']:8.1f} ms CPU, {cpu[name]:.3f}x {ref}"
        )
    if not args.json:
        print("\n".join(lines))
        return times
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "rules", "data_root")}
    return save({**settings, "reference": ref, "rules": times}, args.json, "\n".join(lines))


if __name__ == "__main__":
    main()
