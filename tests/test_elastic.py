"""Elastic stage count (pipeline.elastic) on a real local Ray cluster of 3 CPUs: a stage's worker
is SIGKILLed while a CPU is taken from the cluster, the 3 stages cannot be placed again, and the
run goes on from its last checkpoint on 2; given the CPU back, it grows back to 3 at a
checkpoint. Sync float64 weights do not depend on the stage count, so the run must end with the
weights of one process trained on the same data: nothing lost, nothing learned twice."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from ckpt_helpers import CHAINED, TINY
from prometheus_client import generate_latest

from driver.api.metrics import Metrics, MetricsServer
from driver.api.metrics_callback import MetricsCallback
from driver.config import config_to_dict, load_config
from driver.pipeline.elastic import Elastic, largest_fitting
from driver.pipeline.partition import Partition
from driver.run import checkpoint_store
from driver.run.callbacks import Callback, RunState, RunView
from driver.run.controller import Controller
from driver.run.train import train

BASE = [*TINY, "train.checkpoint_every=4", "pipeline.micro_batches=2", CHAINED]
ELASTIC = [
    *BASE,
    "pipeline.stages=3",
    "pipeline.boundaries=[1, 3]",
    "pipeline.elastic=true",
    # the K = 3 placement that cannot succeed waits this long (so does a start: room for a
    # loaded machine); the object store, not gloo, saves the gloo group's start-up
    "pipeline.placement_timeout_s=30",
    'pipeline.transport="object_store"',
    "train.max_restarts=3",
]
STEPS = 19  # digits' training split in batches of 64


# -- the choice, without a cluster ----------------------------------------------------------------
def test_largest_fitting_k_counts_free_resources_per_node():
    cpu = {"CPU": 1.0}
    assert largest_fitting(3, cpu, "PACK", [{"CPU": 2.0}]) == 2
    assert largest_fitting(4, cpu, "PACK", [{"CPU": 1.0}, {"CPU": 2.0}]) == 3
    assert largest_fitting(3, cpu, "STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}]) == 1  # no node 2
    assert largest_fitting(3, {"CPU": 1.0, "GPU": 1.0}, "PACK", [{"CPU": 8.0, "GPU": 1.0}]) == 1


def test_a_smaller_k_is_cut_from_the_costs_already_profiled():
    el = Elastic(load_config(None, ["pipeline.elastic=true"]))
    names = tuple(f"b{i}" for i in range(6))
    el._remember(Partition((0, 1, 3, 6), (3.0, 2.0, 3.0), names))  # 3, 1+1, 1+1+1
    assert el.bounds_for(3) == (0, 1, 3, 6)  # the asked K keeps its own partition
    assert el.bounds_for(2) == (0, 2, 6)  # blocks cost 3, 1, 1, 1, 1, 1: 4 | 4
    assert el.partition((0, 2, 6)).stage_costs == (4.0, 4.0)
    el._remember(Partition((0, 1, 3, 6), (0.0, 0.0, 0.0), names))  # explicit cuts: not profiled
    assert el.bounds_for(2) == (0, 3, 6) and el.partition((0, 3, 6)).stage_costs == (0.0, 0.0)


def test_without_elastic_nothing_is_checked():
    cfg = load_config(None, ["pipeline.stages=3"])
    el = Elastic(cfg)
    el._remember(Partition((0, 1, 3, 6), (0.0, 0.0, 0.0), tuple("abcdef")))
    el.k = 2
    assert not el.on and not el.grow_due(cfg, None)  # no cluster is asked (none is connected)


# -- a real cluster ---------------------------------------------------------------------------
@ray.remote(num_cpus=1)
class Hold:
    """Takes one CPU from the cluster while it lives."""

    def ping(self) -> bool:
        return True


class StageCounts(Callback):
    """(step, stage count) of every runner the run built, in order."""

    def __init__(self) -> None:
        self.built: list[tuple[int, int]] = []

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        if previous is RunState.STARTING and current is RunState.RUNNING:
            self.built.append((ctl.run.steps, len(ctl.run.partition) - 1))


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=3, include_dashboard=False, namespace="reclra-elastic")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_process(digits, tmp_path_factory):
    """The final units of the same run in one process (K = 1, no Ray)."""
    out = tmp_path_factory.mktemp("one")
    cfg = load_config(None, [*BASE, "pipeline.stages=1"])
    assert train(cfg, quiet=True, out_dir=out, splits=digits).steps == STEPS
    return _final_units(out)


def _final_units(out: Path) -> dict:
    return checkpoint_store.load(out / "rec_lra" / "checkpoints")["runner"]["units"]


def _kill_worker(actor) -> None:  # noqa: ANN001
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)


def _scrape(server: MetricsServer, run: str) -> float:
    text = urllib.request.urlopen(server.url, timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'reclra_stages{{run="{run}"}}'))
    return float(line.split()[-1])


def _free_cpus_at_least(n: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < n:
        assert time.monotonic() < deadline, f"{n} CPU not free within {timeout_s}s"
        time.sleep(0.1)


def _elastic_run(digits, out: Path, run_id: str) -> tuple[Controller, Metrics, StageCounts]:  # noqa: ANN001
    """The elastic K = 3 run (ELASTIC), its metrics, and the stage counts it builds."""
    metrics, counts = Metrics(), StageCounts()
    ctl = Controller(
        load_config(None, ELASTIC),
        out_dir=out,
        splits=digits,
        run_id=run_id,
        callbacks=[MetricsCallback(metrics, run_id), counts],
    )
    return ctl, metrics, counts


@pytest.mark.ray
def test_a_run_that_cannot_place_3_stages_again_goes_on_on_2_then_grows_back(
    cluster, digits, one_process, tmp_path
):
    """K = 3 elastic, a checkpoint every 4 steps. At step 6 stage 1's worker is SIGKILLed;
    while the run recovers a CPU is taken, so 3 stages cannot be placed: it goes on from step 4
    on 2. At step 9 the CPU is given back: the checkpoint at step 12 finds room for 3 and the
    run grows back. /metrics is scraped after every build."""
    ctl, metrics, counts = _elastic_run(digits, tmp_path, "el")
    asked, asked_dict = ctl.cfg, config_to_dict(ctl.cfg)
    server = MetricsServer(metrics)
    gauge: list[float] = []
    hold, killed, shrunk = None, False, None
    try:
        while not ctl.done:
            ctl.step()
            if len(counts.built) > len(gauge):
                gauge.append(_scrape(server, "el"))
            if not killed and ctl.run.steps == 6 and ctl.state is RunState.RUNNING:
                _kill_worker(ctl.runner.group.actors[1])  # type: ignore[union-attr]
                killed = True
            if killed and hold is None and shrunk is None and ctl.state is RunState.RECOVERING:
                hold = Hold.remote()  # the stages are gone: it takes a CPU before they can
                assert ray.get(hold.ping.remote(), timeout=60)
            if hold is not None and ctl.run.steps == 9 and ctl.state is RunState.RUNNING:
                shrunk = (ctl.restarts, counts.built[-1], gauge[-1], list(ctl.run.partition))
                ray.kill(hold)
                hold = None
                _free_cpus_at_least(1.0)
    finally:
        if hold is not None:
            ray.kill(hold)
        server.close()
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert shrunk is not None and "stage 1" in (ctl.error or "")  # the loss, named
    restarts, built, stages_gauge, partition = shrunk
    assert restarts >= 1  # the loss, counted (a start that missed its deadline adds one)
    assert built == (4, 2) and stages_gauge == 2.0  # from the checkpoint at step 4, on 2
    assert len(partition) == 3  # two stages, cut evenly (the cuts asked for were explicit)
    assert counts.built[-1] == (12, 3) and gauge[-1] == 3.0  # grown back at step 12
    assert ctl.restarts == restarts  # neither the shrink nor the growth counts as a restart
    assert ctl.run.partition[:3] == [0, 1, 3]  # the partition asked for, again
    assert ctl.run.steps == STEPS  # the full step count
    # the config is input, never state: the same object, unchanged, through shrink and growth
    assert ctl.cfg is asked and config_to_dict(ctl.cfg) == asked_dict
    assert ctl.cfg.pipeline.stages == 3 and ctl.plan is not None and ctl.plan.k == 3
    _assert_same_weights(_final_units(tmp_path), one_process)  # nothing lost or learned twice


def _assert_same_weights(units: dict, ref: dict) -> None:
    assert units.keys() == ref.keys()
    for name in ref:
        for key, t in ref[name]["tensors"].items():
            torch.testing.assert_close(units[name]["tensors"][key], t, rtol=1e-12, atol=1e-12)


@pytest.mark.ray
@pytest.mark.slow
def test_with_one_cpu_free_the_run_trains_in_process_then_grows_to_3(
    cluster, digits, one_process, tmp_path
):
    """Two CPUs are taken before the run starts: 3 stages cannot be placed, 2 do not fit the
    one CPU left, so the run trains in this process (K = 1) from its start. Both CPUs come back
    at step 5 and the checkpoint at step 8 starts the 3 stages from the state trained so far."""
    holds = [Hold.remote() for _ in range(2)]
    assert ray.get([h.ping.remote() for h in holds], timeout=60)
    ctl, metrics, counts = _elastic_run(digits, tmp_path, "one")
    try:
        while not ctl.done:
            ctl.step()
            if holds and ctl.run.steps == 5 and ctl.state is RunState.RUNNING:
                assert ctl.runner is not None and not hasattr(ctl.runner, "group")  # in process
                for h in holds:
                    ray.kill(h)
                holds = []
                _free_cpus_at_least(3.0)
    finally:
        for h in holds:
            ray.kill(h)
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert counts.built == [(0, 1), (8, 3)] and ctl.restarts == 0
    assert 'reclra_stages{run="one"} 3.0' in generate_latest(metrics.registry).decode()
    assert ctl.run.steps == STEPS
    _assert_same_weights(_final_units(tmp_path), one_process)
