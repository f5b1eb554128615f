"""Benchmark: a calibrated scaling model of layer-parallel training.

    python -m bench.scaling --json bench/results/scaling_cpu.json [--rounds 3 --steps 4]

1. Measures a Ray link here (call cost, hop latency, hop bandwidth: bench.scaling.profile).
2. Validates the simulation (bench.scaling.sim, driven by driver/pipeline/schedule.py) against
   the real pipeline here: ResNet-8 (width 32, synthetic 32x32, batch 32, 4 micro-batches),
   rec-LRA broadcast (skip) and mirror, K = 1, 2, 3, sync and async, predicted against measured
   samples/s (bench.scaling.validate).
3. Projects K = 2..64 for ImageNet-form ResNet-18/34/50 from each device profile in
   bench/profiles (bench.scaling.project); `projection` is the --profile one. Rules: rec-LRA
   skip, mirror and decoupled stages (auxiliary heads, window 1), backprop 1F1B and GPipe, on
   the stream and p2p engines, sync and (skip, decoupled) async; K = 8 side by side at the end.
   --skip-validation runs the projections alone (about 1.6 minutes on 2 cores).
4. Plots speedup against K (bench/results/scaling.png) and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.output import save
from bench.scaling.project import KS, load_profile, project, sensitivity

MODELS = ["resnet18", "resnet34", "resnet50"]
RULES_SHOWN = [
    "rec_lra",
    "rec_lra_mirror",
    "backprop_1f1b",
    "backprop_gpipe",
    "rec_lra_async",
    "rec_lra_p2p",
    "rec_lra_async_p2p",
    "rec_lra_mirror_p2p",
    "backprop_1f1b_p2p",
    "rec_lra_decoupled",
    "rec_lra_decoupled_async",
    "rec_lra_decoupled_p2p",
    "rec_lra_decoupled_async_p2p",
]
# decoupled stages beside the chained rule (rec-LRA mirror, 1F1B), backprop 1F1B and rec-LRA
# skip (e_L broadcast), per engine and schedule; "" where no such row is projected (async runs
# are projected for skip and decoupled alone)
SIDE_BY_SIDE = {
    "stream sync": ("rec_lra_decoupled", "rec_lra_mirror", "backprop_1f1b", "rec_lra"),
    "stream async": ("rec_lra_decoupled_async", "", "", "rec_lra_async"),
    "p2p sync": ("rec_lra_decoupled_p2p", "rec_lra_mirror_p2p", "backprop_1f1b_p2p", "rec_lra_p2p"),
    "p2p async": ("rec_lra_decoupled_async_p2p", "", "", "rec_lra_async_p2p"),
}


def plot(projections: dict, path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend switch

    names = list(projections)
    fig = Figure(figsize=(4 * len(MODELS), 3.4 * len(names)))
    axes = fig.subplots(len(names), len(MODELS), squeeze=False)
    for i, prof in enumerate(names):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            entry = projections[prof][model]
            for rule in RULES_SHOWN:
                ks = [k for k in (1, *KS) if entry[rule].get(str(k))]
                sp = [k * entry[rule][str(k)]["efficiency"] for k in ks]
                style = "--" if "decoupled" in rule else "-"  # the colours repeat after 10
                ax.plot(ks, sp, style, marker="o", ms=3, label=rule)
            top = max(k for k in (1, *KS) if entry["rec_lra"].get(str(k)))
            ax.plot([1, top], [1, top], "k:", lw=0.8, label="ideal")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{model}, {prof} (M={entry['micro_batches']})", fontsize=9)
            ax.set_xlabel("stages K")
            ax.set_ylabel("speedup over K = 1")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def tables(result: dict) -> str:
    lines = []
    val = result.get("validation")
    if val:
        lines.append(
            "validation (samples/s)         measured  predicted  rel.error   raw pred  raw error"
        )
        for rule, res in val.items():
            for k in sorted(x for x in res if x.isdigit()):
                for sched, v in res[k].items():
                    lines.append(
                        f"  {rule:<15} K={k} {sched:<5} {v['measured_samples_per_s']:9.1f}"
                        f" {v['predicted_samples_per_s']:10.1f} {v['relative_error']:+9.1%}"
                        f" {v.get('predicted_raw_samples_per_s', 0):10.1f}"
                        f" {v.get('relative_error_raw', 0):+9.1%}"
                    )
    for prof, proj in result["projections"].items():
        ks = [k for k in KS if k <= 18]
        lines.append(f"projection {prof}: efficiency (speedup / K)")
        lines.append(
            "  model    rule                        " + "".join(f"{'K=' + str(k):>7}" for k in ks)
        )
        for model in MODELS:
            for rule in RULES_SHOWN:
                row = proj[model][rule]
                cells = [
                    f"{row[str(k)]['efficiency']:7.2f}" if row.get(str(k)) else "      -"
                    for k in ks
                ]
                lines.append(f"  {model:<8} {rule:<27} " + "".join(cells))
        lines.append(side_by_side(proj))
    return "\n".join(lines)


def side_by_side(proj: dict, k: int = 8) -> str:
    """Efficiency at K = k of decoupled stages, the chained rule (rec-LRA mirror, 1F1B),
    backprop 1F1B and rec-LRA skip, per model, engine and schedule (SIDE_BY_SIDE), and the
    micro-batches a stage holds between a forward and its learn."""
    lines = [f"  K={k}: decoupled / mirror (1F1B) / backprop 1F1B / skip, efficiency"]
    for model in MODELS:
        cells = []
        for sched, rules in SIDE_BY_SIDE.items():
            vals = []
            for rule in rules:
                row = proj[model][rule].get(str(k)) if rule else None
                vals.append(f"{row['efficiency']:.2f}" if row else "-")
            cells.append(f"{sched} {' / '.join(vals)}")
        lines.append(f"  {model:<8} " + "; ".join(cells))
    row = proj[MODELS[0]]
    held = {r: row[r][str(k)]["held_micro_batches"] for r in ("rec_lra_decoupled", "backprop_1f1b")}
    lines.append(f"  micro-batches held per stage at K={k}: {held}")
    return "\n".join(lines)


def headline(val: dict, rule: str = "rec_lra", sched: str = "sync") -> None:
    """validation.<K> = the rec-LRA broadcast (skip) sync run at K (all runs stay under
    validation.<rule>.<K>.<schedule>)."""
    for k, v in list(val[rule].items()):
        if k.isdigit():
            val[k] = {"rule": rule, "schedule": sched, **v[sched]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default="bench/results/scaling.png")
    p.add_argument("--profiles", default="bench/profiles")
    p.add_argument("--profile", default="a100", help="the profile reported as `projection`")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run and round")
    p.add_argument("--ks", default="1,2,3", help="validation stage counts")
    p.add_argument("--cores", type=float, default=0, help="cores in validation (0: this CPU's)")
    p.add_argument(
        "--more-micro-batches",
        default="",
        help="also validate at these micro-batch counts, e.g. 16 (costs calibrated at 4)",
    )
    p.add_argument("--skip-validation", action="store_true")
    p.add_argument("--measure-profile", default="", help="write a cpu_here profile TOML here")
    args = p.parse_args(argv)
    result: dict = {}
    if not args.skip_validation or args.measure_profile:
        import os

        import ray

        from bench.scaling.profile import measure_link

        ray.init(address="local", num_cpus=32, include_dashboard=False)  # our own (logical CPUs)
        try:
            link = measure_link()
            print(f"link: {link}", flush=True)
            result["link"] = link
            if args.measure_profile:
                from bench.scaling.toml import measure, write

                write(args.measure_profile, measure(64, 8, 2), link, 64, 8)
            if not args.skip_validation:
                from bench.scaling.validate import validate

                cores = args.cores or float(os.cpu_count() or 1)
                result["validation_cores"] = cores
                result["validation"] = validate(
                    link,
                    ks=tuple(int(k) for k in args.ks.split(",")),
                    rounds=args.rounds,
                    steps=args.steps,
                    cores=cores,
                    more_micro_batches=tuple(
                        int(v) for v in args.more_micro_batches.split(",") if v
                    ),
                )
                headline(result["validation"])
        finally:
            ray.shutdown()
    result["projections"] = {}
    for path in sorted(Path(args.profiles).glob("*.toml")):
        prof = load_profile(path)
        result["projections"][path.stem] = {
            **project(prof, MODELS),
            "source": str(path),
            "micro_batch": prof["micro_batch"],
            "micro_batches": prof["micro_batches"],
            "sensitivity_k8": {m: sensitivity(prof, m, 8) for m in MODELS},
        }
    if args.profile in result["projections"]:
        result["projection"] = result["projections"][args.profile]
    plot({k: v for k, v in result["projections"].items()}, args.plot)
    return save(result, args.json, tables(result))


if __name__ == "__main__":
    main()
