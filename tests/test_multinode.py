"""Multi-node on Ray's own test cluster (ray.cluster_utils.Cluster): a head with no CPUs and
three one-CPU worker nodes, each a separate raylet with its own resources. Stages placed
STRICT_SPREAD land on different nodes; losing a node holding a stage mid-run recovers on the
nodes left, from the last checkpoint, to the weights of one process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from cluster.errors import PlacementError
from cluster.group import ActorGroup
from cluster.placement import cluster_can_grow, never_fits, node_resources
from driver.config import load_config
from driver.run import checkpoint_store
from driver.run.controller import Controller, RunState
from driver.run.train import train

pytestmark = pytest.mark.ray

WORKERS = ("node_a", "node_b", "node_c")  # a custom resource naming each worker node
BASE = [
    'rule.topology="mirror"',  # the chained rule (K > 1 is decoupled unless a rule key says)
    "model.width=4",
    "train.epochs=1",
    "train.batch_size=64",  # 19 steps of digits
    "train.compare=[]",
    'train.dtype="float64"',
    "train.checkpoint_every=5",
    "train.keep_checkpoints=0",
    "train.max_restarts=2",
    "pipeline.micro_batches=2",
    'pipeline.strategy="STRICT_SPREAD"',
    "pipeline.placement_timeout_s=60",
]


@pytest.fixture(scope="module")
def nodes():
    """The cluster and its worker nodes by name. The head has no CPUs, so no stage lands on it
    (removing the head would end the cluster); the driver joins by address. A lost node is
    declared dead after ~1.5 s of missed health checks (Ray's defaults: about 15 s)."""
    if ray.is_initialized():  # another module's local Ray
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
            },
        },
    )
    try:
        workers = {name: cluster.add_node(num_cpus=1, resources={name: 1}) for name in WORKERS}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="reclra-multinode")
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The final weights of the same run in one process (K = 1, no Ray)."""
    cfg = load_config(None, [*BASE, "pipeline.stages=1"])
    out = tmp_path_factory.mktemp("one-process")
    log = train(cfg, quiet=True, out_dir=out, splits=digits)
    assert log.steps == 19
    return _final_units(out)


def _final_units(out: Path) -> dict:
    return checkpoint_store.load(out / "rec_lra" / "checkpoints")["runner"]["units"]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key, t in a[name]["tensors"].items():
            diff = (b[name]["tensors"][key] - t).abs().max().item() if t.numel() else 0.0
            assert torch.equal(b[name]["tensors"][key], t), f"{name}.{key}: max |diff| {diff}"


def _stage_nodes(ctl: Controller) -> list[str]:
    """The node of each stage actor, as the actor itself reports it (workers/ knows no Ray),
    checked against where the placement group put each bundle."""
    group = ctl.runner.group  # type: ignore[union-attr]
    said = ray.get(
        [
            a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
            for a in group.actors
        ],
        timeout=60,
    )
    table = placement_group_table(group.pg)
    assert table["strategy"] == "STRICT_SPREAD"
    assert said == [table["bundles_to_node_id"][i] for i in range(len(said))]
    assert ctl.runner.transport == "gloo"  # type: ignore[union-attr]  # node to node by gloo
    return said


@pytest.mark.parametrize("engine", ["stream", "p2p"])
def test_strict_spread_puts_each_stage_on_its_own_node_with_one_process_weights(
    nodes, digits, reference, tmp_path, engine
):
    """K = 3 over three worker nodes: one stage per node, none on the head, and the final
    weights (float64, sync) equal one process's bit for bit, on either engine (p2p: the
    stages' process group spans the nodes)."""
    cluster, workers = nodes
    cfg = load_config(
        None,
        [*BASE, "pipeline.stages=3", "pipeline.boundaries=[1, 3]", f'pipeline.engine="{engine}"'],
    )
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    placed: list[str] = []
    while not ctl.done:
        ctl.step()
        if not placed and ctl.state is RunState.RUNNING:
            placed = _stage_nodes(ctl)
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.run.steps == 19 and ctl.restarts == 0
    assert len(set(placed)) == 3  # three stages, three nodes
    assert set(placed) == {n.node_id for n in workers.values()}  # the head holds none
    _assert_bitwise_equal(reference, _final_units(tmp_path))


def test_losing_a_node_recovers_on_the_nodes_left_with_nothing_lost(
    nodes, digits, reference, tmp_path
):
    """K = 2 over three worker nodes; the node holding stage 1 is killed (its raylet and every
    worker on it, no grace) at step 8. The run recreates both stages from the step-5
    checkpoint on the two nodes left (the fixed-size placement check must neither refuse nor
    wait), runs all 19 steps, and ends with one process's weights, bit for bit."""
    cluster, workers = nodes
    cfg = load_config(None, [*BASE, "pipeline.stages=2", "pipeline.boundaries=[2]"])
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits)
    before: list[str] = []
    after: list[str] = []
    lost = ""
    seen: list[RunState] = []
    recovered_in = 0.0
    while not ctl.done:
        seen.append(ctl.step())
        if ctl.state is not RunState.RUNNING:
            continue
        if not before:
            before = _stage_nodes(ctl)
        elif not lost and ctl.run.steps == 8:
            lost = before[1]
            victim = next(n for n in workers.values() if n.node_id == lost)
            cluster.remove_node(victim, allow_graceful=False)
            t0 = time.monotonic()
        elif lost and not after and ctl.restarts == 1:
            recovered_in = time.monotonic() - t0
            after = _stage_nodes(ctl)
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.restarts == 1 and RunState.RECOVERING in seen
    assert ctl.run.steps == 19 and ctl.run.restarts == 1  # the full step count
    assert len(set(before)) == 2 and len(set(after)) == 2
    assert lost not in after  # the recreated stages live on the nodes left
    assert set(after) <= {n.node_id for n in workers.values()}
    assert recovered_in < cfg.pipeline.placement_timeout_s
    _assert_bitwise_equal(reference, _final_units(tmp_path))

    # the placement check on the cluster now: it cannot grow (no autoscaler), two stages
    # fit the two nodes left, and three cannot, which fails at once rather than at the deadline.
    # (Until Ray declares the lost node dead it still counts as a node: a placement then waits,
    # up to pipeline.placement_timeout_s, instead of failing at once.)
    deadline = time.monotonic() + 30
    while len(node_resources()) > 3 and time.monotonic() < deadline:  # the head and two
        time.sleep(0.2)
    assert not cluster_can_grow()
    two, three = [{"CPU": 1.0}] * 2, [{"CPU": 1.0}] * 3
    assert never_fits(two, "STRICT_SPREAD", node_resources()) == ""
    assert "fewer than 3 nodes" in never_fits(three, "STRICT_SPREAD", node_resources())
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="cannot grow"):
        ActorGroup(
            _Probe,
            [()] * 3,
            cpus=1.0,
            gpus=0.0,
            strategy="STRICT_SPREAD",
            placement_timeout_s=60.0,
            timeout_key="pipeline.placement_timeout_s",
        )
    assert time.monotonic() - t0 < 5.0


class _Probe:
    def ping(self) -> bool:
        return True
