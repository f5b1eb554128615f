"""Projection of K = 2..64 stages from a device profile (bench/profiles/*.toml), and the block
arithmetic (MACs, activation sizes) of ImageNet-form ResNet-18/34/50 at 224x224.

A profile gives, per model and per rule family (rec_lra = broadcast/skip, rec_lra_mirror,
backprop), per-block forward / learn seconds per sample and apply seconds per step, the bytes
per sample crossing each block boundary, the link (call cost, latency, bandwidth) and the
micro-batch size and count to project at. Per-micro-batch costs are per-sample costs times the
micro-batch size (linear in the batch: an assumption, optimistic for small GPU micro-batches).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.scaling.sim import RULES, StageCosts, one_process, step_seconds
from driver.pipeline.partition import best_partition
from driver.pipeline.stage_count import calls_per_micro_batch

KS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FAMILY = {  # projected rule -> the profile's cost family
    "rec_lra": "rec_lra",
    "rec_lra_mirror": "rec_lra_mirror",
    "backprop_gpipe": "backprop",
    "backprop_1f1b": "backprop",
}
DRIVER_KEYS = ("driver_call_s", "driver_p2p_call_s")
P2P = {f"{rule}_p2p": family for rule, family in FAMILY.items()}  # the p2p engine (sync)
ASYNC = {"rec_lra_async": "rec_lra", "rec_lra_async_p2p": "rec_lra"}  # e_L broadcast, async


def resnet_blocks(name: str, size: int = 224, classes: int = 1000) -> list[dict]:
    """Blocks of the ImageNet-form ResNet (stem with max-pool, residual blocks, head): name,
    forward MACs per sample, output elements per sample. ResNet-50 uses v1.5 bottlenecks
    (stride in the 3x3), as torchvision and NVIDIA's published figures do."""
    layout = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[name]
    bottleneck = name == "resnet50"
    h = size // 2  # stem: 7x7 stride 2
    blocks = [{"name": "stem", "macs": 49 * 3 * 64 * h * h, "out": 64 * (h // 2) ** 2}]
    h //= 2  # max-pool
    c = 64
    for s, n in enumerate(layout):
        width = 64 * 2**s
        c_out = 4 * width if bottleneck else width
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            ho = h // stride
            if bottleneck:
                macs = c * width * h * h + 9 * width * width * ho * ho + width * c_out * ho * ho
            else:
                macs = 9 * c * c_out * ho * ho + 9 * c_out * c_out * ho * ho
            if stride != 1 or c != c_out:
                macs += c * c_out * ho * ho  # 1x1 projection shortcut
            blocks.append({"name": f"layer{s + 1}.{b}", "macs": macs, "out": c_out * ho * ho})
            c, h = c_out, ho
    blocks.append({"name": "head", "macs": c * classes, "out": classes})
    return blocks


def load_profile(path: str | Path) -> dict:
    return tomllib.loads(Path(path).read_text())


def stage_costs(
    prof: dict, model: str, family: str, k: int, *, sync: bool = True, engine: str = "stream"
) -> tuple[StageCosts, tuple]:
    """Per-stage costs of `model` under `family` cut into k stages (the balanced cut of the
    blocks' forward + learn, driver/pipeline/partition.best_partition)."""
    mdl = prof["models"][model]
    fam = mdl[family]
    b = prof["micro_batch"]
    f = [b * v for v in fam["forward_s"]]
    lrn = [b * v for v in fam["learn_s"]]
    ap = list(fam["apply_s"])
    bounds = best_partition([x + y for x, y in zip(f, lrn, strict=True)], k)
    spans = list(zip(bounds, bounds[1:], strict=False))
    out = [b * v for v in mdl["out_bytes"]]  # per micro-batch
    e_l = out[-1]
    chained = family != "rec_lra"
    link = prof["link"]
    costs = StageCosts(
        forward=tuple(sum(f[a:z]) for a, z in spans),
        # async: no apply op; one optimizer step a step (apply_every = 0), spread over its learns
        learn=tuple(
            sum(lrn[a:z]) + (0.0 if sync else sum(ap[a:z]) / prof["micro_batches"])
            for a, z in spans
        ),
        apply=tuple(sum(ap[a:z]) for a, z in spans),
        # p2p: no actor call per op, only its messages (p2p_op_s); the top's ops are two
        call=float(link.get("p2p_op_s", 0.0)) if engine == "p2p" else link["call_s"],
        fused_top=engine != "p2p",
        latency=link["latency_s"],
        bandwidth=link["bandwidth_Bps"],
        node_size=int(link.get("stages_per_node", 0)),
        intra_bandwidth=float(link.get("intra_bandwidth_Bps", float("inf"))),
        fwd_bytes=tuple(0.0 if a == 0 else out[a - 1] for a, _ in spans),
        # chained: the boundary signal is the size of the stage's output; broadcast: e_L
        signal_bytes=tuple((out[z - 1] if chained else e_l) for _, z in spans),
        # the driver submits its calls and gathers their results, in its own process
        driver=(
            float(link.get("driver_p2p_call_s" if engine == "p2p" else "driver_call_s", 0.0))
            * calls_per_micro_batch(k, prof["micro_batches"], sync=sync, engine=engine)
            if k > 1
            else 0.0
        ),
    )
    return costs, bounds


def project(prof: dict, models: list[str], ks: tuple[int, ...] = KS) -> dict:
    """projection[model][rule][K] = step seconds, samples/s, speedup over K = 1 of the same
    rule (one process: every op in turn, no calls, no hops), efficiency = speedup / K. K above
    the model's block count is capped there (a stage holds at least one block) and reported
    as null."""
    m = prof["micro_batches"]
    cores = float(prof.get("cores", float("inf")))
    batch = m * prof["micro_batch"]
    out: dict = {}
    for model in models:
        n = len(prof["models"][model]["out_bytes"])
        out[model] = {"blocks": n, "micro_batches": m, "micro_batch": prof["micro_batch"]}
        for rule, family in [*FAMILY.items(), *P2P.items(), *ASYNC.items()]:
            engine = "p2p" if rule.endswith("_p2p") else "stream"
            spec = RULES[ASYNC.get(rule, rule.removesuffix("_p2p"))]
            sync = rule not in ASYNC
            one, _ = stage_costs(prof, model, family, 1)
            t1 = one_process(one, m)
            row: dict = {"1": {"step_s": t1, "samples_per_s": batch / t1, "efficiency": 1.0}}
            for k in ks:
                if k > n:
                    row[str(k)] = None
                    continue
                costs, bounds = stage_costs(prof, model, family, k, sync=sync, engine=engine)
                # async: the steady state of a 16-step stream (a run flushes once an epoch)
                t = step_seconds(costs, spec, m, sync=sync, cores=cores, steps=16, engine=engine)
                row[str(k)] = {
                    "step_s": t,
                    "samples_per_s": batch / t,
                    "speedup": t1 / t,
                    "efficiency": t1 / t / k,
                    "bounds": list(bounds),
                }
            out[model][rule] = row
    return out


def balance_bound(prof: dict, model: str, family: str, k: int) -> float:
    """Efficiency the block-level cut allows at best: mean stage work over the slowest's."""
    costs, _ = stage_costs(prof, model, family, k)
    work = [f + lr for f, lr in zip(costs.forward, costs.learn, strict=True)]
    return sum(work) / (k * max(work))


def sensitivity(prof: dict, model: str, k: int = 8) -> dict:
    """Efficiency at K = k of each rule as profiled, with no driver cost, with no per-call
    cost at all (stages' and driver's), with 4x larger micro-batches (the same count), and
    both: what holds the projection below 1."""
    import copy

    variants = {
        "as_profiled": prof,
        "no_driver": {**prof, "link": {**prof["link"], **dict.fromkeys(DRIVER_KEYS, 0.0)}},
        "no_call_cost": {
            **prof,
            "link": {**prof["link"], **dict.fromkeys((*DRIVER_KEYS, "call_s", "p2p_op_s"), 0.0)},
        },
        "micro_batch_x4": {**prof, "micro_batch": 4 * prof["micro_batch"]},
    }
    variants["no_call_cost_micro_batch_x4"] = {
        **copy.deepcopy(variants["no_call_cost"]),
        "micro_batch": 4 * prof["micro_batch"],
    }
    out: dict = {}
    for name, p in variants.items():
        proj = project(p, [model], (k,))[model]
        out[name] = {
            rule: proj[rule][str(k)]["efficiency"] for rule in proj if isinstance(proj[rule], dict)
        }
    out["balance_bound"] = {fam: balance_bound(prof, model, fam, k) for fam in set(FAMILY.values())}
    return out
