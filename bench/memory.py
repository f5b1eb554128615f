"""Benchmark: the memory estimate (driver/run/memory.py) against measured peak RSS.

    python -m bench.memory --json bench/results/memory_cpu.json

Each config trains `--steps` steps to the end of a run (validation, test, the final
checkpoint) in a fresh process of its own, as the service would run it: one process (K = 1),
the run's Controller, its defaults (a checkpoint at the start and at the end), synthetic data
or the bundled digits. The child reports its peak resident set (the high-water mark of its own
address space, shared libraries included: /proc/self/status VmHWM. Not getrusage's ru_maxrss:
Linux carries that across fork and exec, so a child of a 2 GiB parent reports at least 2 GiB
whatever it used); the parent
estimates the same config without building it. The ratio estimate / measured should lie a
little above 1: the estimate is meant to err high, by a modest factor. Runs go one at a time,
each with one torch thread (train.threads = 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench.output import save

MIB, GIB = 1 << 20, 1 << 30

SYNTH = '[data]\nname = "synthetic"\nsynthetic_size = 1024\n'

# name -> TOML (on top of defaults: rec_lra's recipe, AdamW, ResNet-8 w16, digits)
CONFIGS: dict[str, str] = {
    "digits resnet8 w16 rec_lra b32 (defaults)": "",
    "digits mlp backprop b32": '[model]\nname = "mlp"\n[rule]\nname = "backprop"\n',
    "synthetic resnet8 w16 rec_lra b128": SYNTH + "[train]\nbatch_size = 128\n",
    "synthetic resnet8 w32 backprop b256": SYNTH
    + '[model]\nwidth = 32\n[rule]\nname = "backprop"\n[train]\nbatch_size = 256\n',
    "synthetic resnet8 w32 rec_lra b512": SYNTH
    + "[model]\nwidth = 32\n[train]\nbatch_size = 512\n",
    "synthetic resnet8 w32 rec_lra b64 float64": SYNTH
    + '[model]\nwidth = 32\n[train]\nbatch_size = 64\ndtype = "float64"\n',
    "synthetic resnet18 w32 backprop b64 float64": SYNTH
    + '[model]\nname = "resnet18"\nwidth = 32\n[rule]\nname = "backprop"\n'
    + '[train]\nbatch_size = 64\ndtype = "float64"\n',
    "synthetic resnet18 w64 backprop b32": SYNTH
    + '[model]\nname = "resnet18"\nwidth = 64\n[rule]\nname = "backprop"\n'
    + "[train]\nbatch_size = 32\n",
    "synthetic 224x224 resnet18 (imagenet form) w32 backprop b32": SYNTH.replace(
        "1024", "64\nsynthetic_shape = [3, 224, 224]"
    )
    + '[model]\nname = "resnet18"\nform = "imagenet"\nwidth = 32\n[rule]\nname = "backprop"\n'
    + "[train]\nbatch_size = 32\n",
    "synthetic resnet18 w16 backprop b512 sgd": SYNTH
    + '[model]\nname = "resnet18"\nwidth = 16\n[rule]\nname = "backprop"\n[optim]\nname = "sgd"\n'
    + "[train]\nbatch_size = 512\n",
}


def _config_text(body: str, steps: int, out_dir: str) -> tuple[str, list[str]]:
    overrides = [
        f"train.max_steps={steps}",
        "train.epochs=1",
        "train.threads=1",
        f'train.out_dir="{out_dir}"',
        "train.compare=[]",
    ]
    return body, overrides


def child(text: str, overrides: list[str]) -> None:
    """Train the config to its end in this process; print its peak RSS as JSON."""
    import logging

    from driver.config import parse_config
    from driver.run.controller import Controller

    logging.disable(logging.WARNING)
    cfg = parse_config(text, overrides)
    t0 = time.perf_counter()
    Controller(cfg, callbacks=[]).run_to_end()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_rss": peak_rss(), "seconds": seconds}))


def peak_rss() -> int:
    """This process's peak resident bytes since its exec: VmHWM of its address space (Linux);
    elsewhere getrusage's ru_maxrss (which on Linux would include the forking parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# the smallest run: its tensors are a few KiB, so its peak is the process baseline
SMALLEST = (
    '[data]\nname = "synthetic"\nsynthetic_shape = [1, 8, 8]\nsynthetic_size = 64\n'
    "[model]\nwidth = 2\n[train]\nbatch_size = 4\n"
)


def baseline(steps: int) -> int:
    """Peak RSS of the smallest run (what BASELINE_BYTES stands for)."""
    with tempfile.TemporaryDirectory(prefix="reclra-bench-memory-") as tmp:
        return _run_child("the smallest run", *_config_text(SMALLEST, steps, tmp))["peak_rss"]


def _run_child(name: str, text: str, overrides: list[str]) -> dict:
    args = [sys.executable, "-m", "bench.memory", "--child", json.dumps([text, overrides])]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(name: str, body: str, steps: int) -> dict:
    from driver.config import parse_config
    from driver.run.memory import estimate_memory

    with tempfile.TemporaryDirectory(prefix="reclra-bench-memory-") as tmp:
        text, overrides = _config_text(body, steps, tmp)
        cfg = parse_config(text, overrides)
        t0 = time.perf_counter()
        est = estimate_memory(cfg)
        est_ms = 1e3 * (time.perf_counter() - t0)
        got = _run_child(name, text, overrides)
    run = est.processes[0]
    above = est.total - est.parts["baseline"]  # what the estimate adds to the process baseline
    return {
        "estimate_above_baseline": above,
        "name": name,
        "config": body,
        "overrides": overrides,
        "estimate": est.total,
        "estimate_line": est.describe(),
        "estimate_parts": est.parts,
        "estimate_phases": {k: sum(v.values()) for k, v in run.phases.items()},
        "peak_phase": run.peak_phase,
        "estimate_ms": est_ms,
        "measured": got["peak_rss"],
        "ratio": est.total / got["peak_rss"],
        "run_seconds": got["seconds"],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="where the results go")
    p.add_argument("--steps", type=int, default=3, help="training steps per run")
    p.add_argument("--only", default="", help="run only configs whose name contains this")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        text, overrides = json.loads(args.child)
        child(text, overrides)
        return {}
    if not args.json:
        p.error("--json is required")
    from driver.run.memory import BASELINE_BYTES

    base = baseline(args.steps)
    rows = []
    for name, body in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        row = measure(name, body, args.steps)
        rows.append(row)
        print(
            f"{name:60s} est {row['estimate'] / GIB:6.2f} GiB  measured "
            f"{row['measured'] / GIB:6.2f} GiB  ratio {row['ratio']:.2f}  "
            f"(peak: {row['peak_phase']}; {row['run_seconds']:.0f} s)",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    for r in rows:  # the tensors' share alone: estimate and measurement less the baseline run
        got = r["measured"] - base - (r["estimate"] - r["estimate_above_baseline"] - BASELINE_BYTES)
        r["ratio_above_baseline"] = r["estimate_above_baseline"] / got if got > 200 * MIB else None
    above = [r["ratio_above_baseline"] for r in rows if r["ratio_above_baseline"] is not None]
    result = {
        "steps": args.steps,
        "threads": 1,
        "baseline_measured": base,
        "baseline_assumed": BASELINE_BYTES,
        "runs": rows,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "above_baseline_min": min(above, default=None),
        "above_baseline_max": max(above, default=None),
        "python": sys.version.split()[0],
        "torch": __import__("torch").__version__,
    }
    table = "\n".join(
        [
            f"{'config':60s} {'estimate GiB':>12s} {'measured GiB':>12s} {'ratio':>6s} "
            f"{'above base':>10s}  peak phase",
            *(
                f"{r['name']:60s} {r['estimate'] / GIB:12.2f} {r['measured'] / GIB:12.2f} "
                f"{r['ratio']:6.2f} {_num(r['ratio_above_baseline']):>10s}  {r['peak_phase']}"
                for r in rows
            ),
            f"baseline (the smallest run): measured {base / MIB:.0f} MiB, "
            f"assumed {BASELINE_BYTES / MIB:.0f} MiB",
            f"estimate / measured: {min(ratios):.2f} to {max(ratios):.2f}, "
            f"median {statistics.median(ratios):.2f}; above the baseline (runs over 200 MiB "
            f"above it): {_num(min(above, default=None))} to {_num(max(above, default=None))}",
        ]
    )
    return save(result, args.json, table)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
