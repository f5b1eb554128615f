"""Elastic stage count (`pipeline.elastic = true`): when the K stages asked for cannot be placed
(the placement deadline passed, or a fixed-size cluster can never hold them), build on the
largest K' < K whose bundles fit the cluster's free resources now (K' = 1 trains in this
process, as `pipeline.stages = 1` does); at a checkpoint, once the cluster can hold K again,
the controller goes back to K. Without it, build() is build_runner() and nothing is checked."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from cluster.errors import PlacementError
from cluster.placement import never_fits
from driver.config import Config
from driver.data.common import DatasetSplits
from driver.pipeline.build import Runner, block_names, build_runner, plan, resolve_device
from driver.pipeline.partition import Partition, best_partition
from driver.pipeline.plan import PipelinePlan, plan_of

log = logging.getLogger(__name__)

Nodes = list[dict[str, float]]


def stage_bundle(cfg: Config) -> dict[str, float]:
    """One stage's placement-group bundle, as RayPipeline asks for it."""
    pc = cfg.pipeline
    cuda = resolve_device(cfg.train.device).startswith("cuda")
    gpus = pc.gpus_per_stage if pc.gpus_per_stage >= 0 else (1.0 if cuda else 0.0)
    return {"CPU": pc.cpus_per_stage, **({"GPU": gpus} if gpus else {})}


def free_nodes(cfg: Config, held: Any = None) -> Nodes:
    """Each alive node's free resources now, plus what placement group `held` (the run's own
    stages, freed when they are replaced) reserves there. Ray not connected (the run starts its
    own local Ray): this machine's cores and GPUs, as that Ray would have them."""
    if not ray.is_initialized():
        cc = cfg.cluster
        gpus = cc.num_gpus if cc.num_gpus >= 0 else torch.cuda.device_count()
        return [{"CPU": float(cc.num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}]
    try:
        from ray._private.state import available_resources_per_node

        nodes = {k: dict(v) for k, v in available_resources_per_node().items()}
    except Exception as exc:  # noqa: BLE001 - a private API: fall back to the cluster's sum
        log.debug("per-node resources unavailable (%s); using the cluster's total", exc)
        nodes = {"": dict(ray.available_resources())}
    if held is not None:
        table = ray.util.placement_group_table(held)
        for i, bundle in table.get("bundles", {}).items():
            node = nodes.get(table.get("bundles_to_node_id", {}).get(i, ""))
            node = node if node is not None else next(iter(nodes.values()))
            for key, amount in bundle.items():
                node[key] = node.get(key, 0.0) + amount
    return list(nodes.values())


def fits(k: int, bundle: dict[str, float], strategy: str, nodes: Nodes) -> bool:
    return not never_fits([bundle] * k, strategy, nodes)


def largest_fitting(below: int, bundle: dict[str, float], strategy: str, nodes: Nodes) -> int:
    """The largest K' < `below` whose K' bundles fit `nodes`; 1 (this process) when none
    of 2 or more does."""
    return next((k for k in range(below - 1, 1, -1) if fits(k, bundle, strategy, nodes)), 1)


class Elastic:
    """The stage count a run asked for, the one it trains on, and the partitions of each."""

    def __init__(self, cfg: Config) -> None:
        self.on = cfg.pipeline.elastic
        self.asked_bounds: tuple[int, ...] | None = None  # the partition of the K asked for
        self.block_costs: list[float] = []  # per block, estimated from that partition
        self.names: tuple[str, ...] = ()
        self.measured = False  # whether block_costs were profiled
        self.k = 0  # stages of the runner built last

    @property
    def asked(self) -> int:
        return len(self.asked_bounds) - 1 if self.asked_bounds else 0

    def build(
        self, cfg: Config, splits: DatasetSplits, bounds: tuple[int, ...] | None
    ) -> tuple[Runner, PipelinePlan]:
        """build_runner(cfg, splits, bounds); elastic, a placement that fails is tried again on
        the largest K' that fits now (each try waits at most pipeline.placement_timeout_s)."""
        if not self.on:
            return build_runner(cfg, splits, bounds)
        if self.asked_bounds is None:
            names = block_names(cfg, splits)
            zero = Partition(tuple(bounds or ()), (0.0,) * (len(bounds or ()) - 1), names)
            self._remember(plan(cfg, splits) if bounds is None else zero)
        bounds = bounds or self.asked_bounds
        assert bounds is not None
        while True:
            k = len(bounds) - 1
            try:
                runner, _ = build_runner(cfg, splits, bounds)
            except PlacementError as exc:
                if k == 1:
                    raise
                bounds = self.shrink(cfg, k, exc)
                continue
            self.k = k
            return runner, plan_of(cfg.pipeline, self.partition(bounds))

    def shrink(self, cfg: Config, k: int, why: PlacementError) -> tuple[int, ...]:
        smaller = largest_fitting(k, stage_bundle(cfg), cfg.pipeline.strategy, free_nodes(cfg))
        where = "in this process" if smaller == 1 else "that fit the free resources"
        log.warning("pipeline.elastic: %d -> %d stages (%s): %s", k, smaller, where, why)
        return self.bounds_for(smaller)

    def grow_due(self, cfg: Config, runner: Runner | None) -> bool:
        """Whether the run trains on fewer stages than asked and the cluster could now hold
        them all (its free resources plus what the run's own stages hold). Not when Ray is
        not connected (K' = 1 after the run's own local Ray, which cannot grow, was stopped)."""
        if not self.on or not 0 < self.k < self.asked or not ray.is_initialized():
            return False
        group = getattr(runner, "group", None)
        nodes = free_nodes(cfg, group.pg if group is not None else None)
        if not fits(self.asked, stage_bundle(cfg), cfg.pipeline.strategy, nodes):
            return False
        log.warning(
            "pipeline.elastic: %d -> %d stages (the cluster can hold them again)",
            self.k,
            self.asked,
        )
        return True

    def bounds_for(self, k: int) -> tuple[int, ...]:
        """The asked partition for the K asked for; else the balanced cut of the block costs
        estimated from it (an even cut where none were measured)."""
        if k == self.asked and self.asked_bounds is not None:
            return self.asked_bounds
        return best_partition(self.block_costs, k)

    def partition(self, bounds: tuple[int, ...]) -> Partition:
        pairs = zip(bounds, bounds[1:], strict=False)
        costs = tuple(sum(self.block_costs[a:b]) if self.measured else 0.0 for a, b in pairs)
        return Partition(bounds=tuple(bounds), stage_costs=costs, block_names=self.names)

    def _remember(self, part: Partition) -> None:
        """The asked partition, and per-block costs: each stage's predicted cost spread evenly
        over its blocks (1.0 each where nothing was measured)."""
        self.asked_bounds, self.names = part.bounds, part.block_names
        self.measured = any(c > 0 for c in part.stage_costs)
        self.block_costs = [1.0] * len(part.block_names)
        pairs = zip(part.bounds, part.bounds[1:], strict=False)
        for (a, b), cost in zip(pairs, part.stage_costs, strict=True):
            if self.measured:
                self.block_costs[a:b] = [cost / (b - a)] * (b - a)
