"""How many stages pay: predicted step time of K stages from measured block costs and hop costs,
the K that minimises it (`pipeline.stages = "auto"`), and a warning when a chosen K is slower
than one process."""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass

import ray
import torch

from driver.pipeline.partition import best_partition

log = logging.getLogger(__name__)

# Measured on a 2-core node (bench.transport, bench.scaling's calibration):
CALL_SECONDS = 1e-3  # one Ray actor call's own latency on a node
DRIVER_CALL_SECONDS = 1.5e-3  # the driver's CPU per stream call (submit, gather)
P2P_OP_SECONDS = 0.42e-3  # a p2p op's own cost (its messages), per op
DRIVER_P2P_CALL_SECONDS = 2.2e-3  # the driver's CPU per p2p step call


@dataclass(frozen=True)
class Prediction:
    k: int
    step_seconds: float
    bounds: tuple[int, ...]
    why: str

    def line(self) -> str:
        return f"K={self.k}: {1e3 * self.step_seconds:.1f} ms/step ({self.why})"


def hop_seconds(t: torch.Tensor) -> float:
    """One hop of tensor `t` between processes on a node: a call's latency plus serialising and
    copying it (measured here, three times, the fastest kept)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        if ray.is_initialized():
            ray.get(ray.put(t))
        else:
            pickle.loads(pickle.dumps(t))
        best = min(best, time.perf_counter() - t0)
    return CALL_SECONDS + best


def calls_per_micro_batch(k: int, m: int, *, sync: bool, engine: str = "stream") -> float:
    """The driver's actor calls per micro-batch at K stages and M micro-batches a step. The
    stream engine: K - 1 forwards, the top's forward + learn, K - 1 learns, and per step a
    stats call to each stage (and under sync an apply to each). The p2p engine: one call per
    stage per step."""
    if engine == "p2p":
        return k / m
    return 2 * k - 1 + (2 * k if sync else k) / m


def predict(
    k: int,
    block_costs: list[float],
    hops: list[float],
    *,
    micro_batches: int,
    cores: float,
    sync: bool,
    single_seconds: float,
    engine: str = "stream",
) -> Prediction:
    """Seconds per step of K stages, M micro-batches each. K = 1: one process with all its
    threads (`single_seconds` per micro-batch, measured). K > 1: each stage's forward + learn
    per micro-batch plus its calls (stream) or its ops' messages (p2p) and the hop into it; the
    slowest stage sets the pace (sync adds the fill and drain bubble, (M + K - 1) / M), unless
    the driver, submitting and gathering every call in turn, is slower still; on fewer cores
    than processes (the stages and the driver) the total work over the cores is a floor."""
    m = micro_batches
    if k == 1:
        return Prediction(1, m * single_seconds, (0, len(block_costs)), "one process")
    bounds = best_partition(block_costs, k)
    per_stage = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        # p2p: no call per op, each of its two ops sends and receives; stream: a call per op,
        # the last stage's forward and learn in one
        calls = 1 if s == k - 1 else 2
        own = 2 * P2P_OP_SECONDS if engine == "p2p" else calls * CALL_SECONDS
        per_stage.append(sum(block_costs[a:b]) + own + (hops[a - 1] if s else 0))
    per_call = DRIVER_P2P_CALL_SECONDS if engine == "p2p" else DRIVER_CALL_SECONDS
    driver = per_call * calls_per_micro_batch(k, m, sync=sync, engine=engine)
    slowest = max(per_stage) * ((m + k - 1) if sync else m)
    shared = m * (sum(per_stage) + driver) / max(min(cores, k + 1), 1.0)
    why = f"slowest stage {1e3 * max(per_stage):.2f} ms/micro-batch"
    step = max(slowest, m * driver, shared)
    if m * driver > slowest:
        why += f", driver-bound ({1e3 * driver:.2f} ms of driver CPU per micro-batch)"
    if shared > max(slowest, m * driver):
        why += f", {cores:g} cores shared by {k} stages and the driver"
    return Prediction(k, step, bounds, why)


def choose(predictions: list[Prediction]) -> Prediction:
    best = min(predictions, key=lambda p: (p.step_seconds, p.k))
    log.info(
        "pipeline.stages = auto: %s chosen of %s",
        best.line(),
        "; ".join(p.line() for p in predictions),
    )
    return best


def warn_if_slower(asked: Prediction, single: Prediction) -> None:
    if asked.step_seconds > single.step_seconds:
        log.warning(
            "pipeline.stages = %d is predicted slower than one process: %s, against %s; "
            'set pipeline.stages = "auto" to let the run choose',
            asked.k,
            asked.line(),
            single.line(),
        )


def cluster_cores(address: str, num_cpus: int) -> float:
    """CPUs the stages can use: the connected cluster's, else this machine's."""
    if ray.is_initialized():
        return float(ray.cluster_resources().get("CPU", 1.0))
    if address or os.environ.get("RAY_ADDRESS"):
        return float("inf")  # an unseen cluster: cores do not bound the prediction
    return float(num_cpus or os.cpu_count() or 1)
