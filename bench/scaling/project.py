"""Projection of K = 2..64 stages from a device profile (bench/profiles/*.toml), and the block
arithmetic (MACs, activation sizes) of ImageNet-form ResNet-18/34/50 at 224x224.

A profile gives, per model and per rule family (rec_lra = broadcast/skip, rec_lra_mirror,
backprop), per-block forward / learn seconds per sample and apply seconds per step, the bytes
per sample crossing each block boundary, the link (call cost, latency, bandwidth) and the
micro-batch size and count to project at. Per-micro-batch costs are per-sample costs times the
micro-batch size (linear in the batch: an assumption, optimistic for small GPU micro-batches).

Decoupled stages (rec_lra_decoupled*) take the mirror family's block costs (the blocks' own
work, as driver/pipeline/partition.profile times it), cut the same way (the head left out of
the balance, as partition.py leaves it), plus on every stage but the top the cost of its
auxiliary head (the recipe's rule.aux_head = "conv2": a 3x3 conv to 2C, stride 2 while the map
is 8 or more wide, a second 3x3 conv at that width, pooled linear): for the ImageNet ResNets
the head's forward MACs over those of the block it sits on (the stage's top block) times that
block's forward, learn and apply seconds (`aux_head_ratios`); a profile's `aux_head_fraction`
overrides the ratio for every block, and AUX_HEAD_FRACTION stands in where the model's MACs
are not known.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.scaling.sim import RULES, StageCosts, held_micro_batches, one_process, step_seconds
from driver.pipeline.partition import best_partition
from driver.pipeline.stage_count import calls_per_micro_batch

KS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FAMILY = {  # projected rule (a sim.RULES key) -> the profile's cost family
    "rec_lra": "rec_lra",
    "rec_lra_mirror": "rec_lra_mirror",
    "backprop_gpipe": "backprop",
    "backprop_1f1b": "backprop",
    # the mirror recipe inside each stage (its blocks' costs), plus an auxiliary head per stage
    "rec_lra_decoupled": "rec_lra_mirror",
}
DRIVER_KEYS = ("driver_call_s", "driver_p2p_call_s")
# async runs: projected name -> rule (e_L broadcast, and decoupled stages)
ASYNC = {
    "rec_lra_async": "rec_lra",
    "rec_lra_async_p2p": "rec_lra",
    "rec_lra_decoupled_async": "rec_lra_decoupled",
    "rec_lra_decoupled_async_p2p": "rec_lra_decoupled",
}
# an auxiliary head's forward + learn over its stage's top block's, where MACs are not known
AUX_HEAD_FRACTION = 0.25


@dataclass(frozen=True)
class Projected:
    """One projected row: a sim.RULES rule, its profile cost family, schedule and engine."""

    rule: str
    family: str
    sync: bool = True
    engine: str = "stream"


def _projected() -> dict[str, Projected]:
    out = {rule: Projected(rule, fam) for rule, fam in FAMILY.items()}  # stream engine, sync
    out |= {f"{rule}_p2p": Projected(rule, fam, engine="p2p") for rule, fam in FAMILY.items()}
    out |= {
        name: Projected(rule, FAMILY[rule], sync=False, engine=_engine(name))
        for name, rule in ASYNC.items()
    }
    return out


def _engine(name: str) -> str:
    return "p2p" if name.endswith("_p2p") else "stream"


PROJECTED = _projected()
DECOUPLED = tuple(name for name, p in PROJECTED.items() if RULES[p.rule].decoupled)


def resnet_blocks(name: str, size: int = 224, classes: int = 1000) -> list[dict]:
    """Blocks of the ImageNet-form ResNet (stem with max-pool, residual blocks, head): name,
    forward MACs per sample, output elements per sample. ResNet-50 uses v1.5 bottlenecks
    (stride in the 3x3), as torchvision and NVIDIA's published figures do."""
    layout = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}[name]
    bottleneck = name == "resnet50"
    h = size // 2  # stem: 7x7 stride 2
    blocks = [
        {
            "name": "stem",
            "macs": 49 * 3 * 64 * h * h,
            "out": 64 * (h // 2) ** 2,
            "shape": (64, h // 2),
            "inner": 64,
        }
    ]
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
            blocks.append(
                {
                    "name": f"layer{s + 1}.{b}",
                    "macs": macs,
                    "out": c_out * ho * ho,
                    "shape": (c_out, ho),
                    "inner": width,  # the narrowest node: an auxiliary head's C
                }
            )
            c, h = c_out, ho
    blocks.append(
        {"name": "head", "macs": c * classes, "out": classes, "shape": (classes, 1), "inner": c}
    )
    return blocks


def aux_head_macs(c: int, h: int, inner: int, classes: int = 1000, convs: int = 2) -> int:
    """Forward MACs per sample of a decoupled stage's auxiliary head (the recipe's
    rule.aux_head = "conv2", workers/aux_heads.head_blocks; convs = 1 for "conv") on a (c, h, h)
    output of a block whose narrowest node has `inner` channels: a 3x3 conv to 2 inner
    channels at stride 2 while the map is 8 or more wide (else to inner at stride 1), a second
    3x3 conv at that width, then a pooled linear layer."""
    stride = 2 if h >= 8 else 1
    width = 2 * inner if stride == 2 else inner
    ho = (h - 1) // stride + 1
    return 9 * c * width * ho * ho + (convs - 1) * 9 * width * width * ho * ho + width * classes


def aux_head_ratios(prof: dict, model: str) -> list[float]:
    """Per block: the cost of an auxiliary head on its output over the block's own cost
    (forward, learn and apply alike). The profile's `aux_head_fraction` if it sets one; else,
    for the ImageNet ResNets, the ratio of forward MACs (the a100 profile spreads its seconds
    by MACs; cpu_here's measured seconds per MAC are the block's); else AUX_HEAD_FRACTION."""
    n = len(prof["models"][model]["out_bytes"])
    if "aux_head_fraction" in prof:
        return [float(prof["aux_head_fraction"])] * n
    try:
        blocks = resnet_blocks(model)
    except KeyError:
        return [AUX_HEAD_FRACTION] * n
    if len(blocks) != n:
        return [AUX_HEAD_FRACTION] * n
    return [aux_head_macs(*b["shape"], b["inner"]) / b["macs"] for b in blocks]


def load_profile(path: str | Path) -> dict:
    return tomllib.loads(Path(path).read_text())


def driver_calls(
    k: int, m: int, *, sync: bool, engine: str = "stream", decoupled: bool = False
) -> float:
    """The driver's calls per micro-batch (stage_count.calls_per_micro_batch). Decoupled
    stages on the stream engine: one forward_learn call per stage and micro-batch, in place of
    K - 1 forwards, the top's forward_learn and K - 1 learns."""
    calls = calls_per_micro_batch(k, m, sync=sync, engine=engine)
    return calls - (k - 1) if decoupled and engine == "stream" else calls


def stage_costs(
    prof: dict,
    model: str,
    family: str,
    k: int,
    *,
    sync: bool = True,
    engine: str = "stream",
    decoupled: bool = False,
) -> tuple[StageCosts, tuple]:
    """Per-stage costs of `model` under `family` cut into k stages (the balanced cut of the
    blocks' forward + learn, driver/pipeline/partition.best_partition). `decoupled`: every
    stage but the top also runs an auxiliary head on its output (aux_head_ratios of its top
    block's forward, learn and apply), left out of the cut as partition.py leaves it."""
    mdl = prof["models"][model]
    fam = mdl[family]
    b = prof["micro_batch"]
    f = [b * v for v in fam["forward_s"]]
    lrn = [b * v for v in fam["learn_s"]]
    ap = list(fam["apply_s"])
    bounds = best_partition([x + y for x, y in zip(f, lrn, strict=True)], k)
    spans = list(zip(bounds, bounds[1:], strict=False))
    if decoupled:  # every stage but the top: its head's seconds join its top block's
        ratio = aux_head_ratios(prof, model)
        for _, z in spans[:-1]:
            h = 1.0 + ratio[z - 1]
            f[z - 1], lrn[z - 1], ap[z - 1] = h * f[z - 1], h * lrn[z - 1], h * ap[z - 1]
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
            * driver_calls(k, prof["micro_batches"], sync=sync, engine=engine, decoupled=decoupled)
            if k > 1
            else 0.0
        ),
    )
    return costs, bounds


def project(
    prof: dict,
    models: list[str],
    ks: tuple[int, ...] = KS,
    rules: Iterable[str] | None = None,
) -> dict:
    """projection[model][rule][K] = step seconds, samples/s, speedup over K = 1 of the same
    rule (one process: every op in turn, no calls, no hops; decoupled: the mirror rule, whose
    one stage has no auxiliary head), efficiency = speedup / K, and the micro-batches each
    stage holds between a forward and its learn (held_micro_batches: its cached activations).
    K above the model's block count is capped there (a stage holds at least one block) and
    reported as null. `rules`: the PROJECTED names to project (all by default)."""
    m = prof["micro_batches"]
    cores = float(prof.get("cores", float("inf")))
    batch = m * prof["micro_batch"]
    out: dict = {}
    for model in models:
        n = len(prof["models"][model]["out_bytes"])
        out[model] = {"blocks": n, "micro_batches": m, "micro_batch": prof["micro_batch"]}
        for name in PROJECTED if rules is None else rules:
            p = PROJECTED[name]
            spec = RULES[p.rule]
            one, _ = stage_costs(prof, model, p.family, 1)
            t1 = one_process(one, m)
            row: dict = {"1": {"step_s": t1, "samples_per_s": batch / t1, "efficiency": 1.0}}
            for k in ks:
                if k > n:
                    row[str(k)] = None
                    continue
                costs, bounds = stage_costs(
                    prof,
                    model,
                    p.family,
                    k,
                    sync=p.sync,
                    engine=p.engine,
                    decoupled=spec.decoupled,
                )
                # async: the steady state of a 16-step stream (a run flushes once an epoch)
                t = step_seconds(
                    costs, spec, m, sync=p.sync, cores=cores, steps=16, engine=p.engine
                )
                row[str(k)] = {
                    "step_s": t,
                    "samples_per_s": batch / t,
                    "speedup": t1 / t,
                    "efficiency": t1 / t / k,
                    "bounds": list(bounds),
                    "held_micro_batches": held_micro_batches(spec, k, m),
                }
            out[model][name] = row
    return out


def balance_bound(prof: dict, model: str, family: str, k: int, *, decoupled: bool = False) -> float:
    """Efficiency the block-level cut allows at best: mean stage work over the slowest's
    (`decoupled`: over the mean work without the auxiliary heads, so the heads count as
    loss, with the stages the cut makes once the heads are added)."""
    plain, _ = stage_costs(prof, model, family, k)
    costs, _ = stage_costs(prof, model, family, k, decoupled=decoupled)
    total = sum(plain.forward) + sum(plain.learn)
    work = [f + lr for f, lr in zip(costs.forward, costs.learn, strict=True)]
    return total / (k * max(work))


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
    # decoupled stages with each head at a flat quarter of its stage's top block (the rule of
    # thumb for a basic residual block), against the head's MACs as projected
    proj = project({**prof, "aux_head_fraction": 0.25}, [model], (k,), rules=DECOUPLED)[model]
    out["aux_head_quarter"] = {rule: proj[rule][str(k)]["efficiency"] for rule in DECOUPLED}
    out["balance_bound"] = {
        fam: balance_bound(prof, model, fam, k) for fam in sorted(set(FAMILY.values()))
    }
    out["balance_bound"]["rec_lra_decoupled"] = balance_bound(
        prof, model, FAMILY["rec_lra_decoupled"], k, decoupled=True
    )
    return out
