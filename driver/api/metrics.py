"""Prometheus metrics for runs: the only prometheus_client importer, and the /metrics endpoint."""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

from driver.run.callbacks import RunState
from workers.spec import StageStats

# reclra_run_state's states, in lifecycle order: an Enum (an OpenMetrics StateSet), one series
# per state, the current one 1 and the others 0, the state in the label `reclra_run_state`
RUN_STATES = tuple(state.value for state in RunState)
M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    """Every metric the service exports, in its own registry. Names: prefix reclra_, base
    units; labels: run, stage, layer only (and the run state's own label). Every series a run
    made is remembered, so that forget_run removes them all when the run leaves memory."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        # run -> the (metric, label values) of every series it has, for forget_run
        self._series: dict[str, set[tuple[MetricWrapperBase, tuple[str, ...]]]] = {}
        self.build = Info("reclra_build", "reclra build information", registry=r)
        self.build.info(
            {
                "version": _version("reclra"),
                "torch": _version("torch"),
                "ray": _version("ray"),
                "python": platform.python_version(),
            }
        )
        self.state = Enum(
            "reclra_run_state",
            "Run state: the series of the current state is 1, the others 0",
            ["run"],
            states=list(RUN_STATES),
            registry=r,
        )
        self.steps = Counter("reclra_steps", "Training steps done", ["run"], registry=r)
        self.samples = Counter("reclra_samples", "Training samples seen", ["run"], registry=r)
        self.step_seconds = Histogram(
            "reclra_step_seconds",
            "Wall time of one training step",
            ["run"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.forward = Counter(
            "reclra_stage_forward_seconds", "Stage time in forward", ["run", "stage"], registry=r
        )
        self.learn = Counter(
            "reclra_stage_learn_seconds",
            "Stage time in learn (and apply)",
            ["run", "stage"],
            registry=r,
        )
        self.idle = Counter(
            "reclra_stage_idle_seconds", "Stage time waiting for work", ["run", "stage"], registry=r
        )
        self.received = Counter(
            "reclra_stage_received_bytes",
            "Activation and error bytes a stage received",
            ["run", "stage"],
            registry=r,
        )
        self.in_flight = Gauge(
            "reclra_stage_in_flight_micro_batches",
            "Micro-batches a stage holds between forward and learn",
            ["run", "stage"],
            registry=r,
        )
        self.cached_bytes = Gauge(
            "reclra_stage_cached_bytes",
            "Most bytes of activations a stage held between forwards and learns in its last stats",
            ["run", "stage"],
            registry=r,
        )
        self.staleness = Gauge(
            "reclra_stage_staleness_updates",
            "Mean updates between a micro-batch's forward and its learn",
            ["run", "stage"],
            registry=r,
        )
        self.local_loss = Gauge(
            "reclra_layer_local_loss",
            "Local loss 0.5*|e|^2 per node",
            ["run", "stage", "layer"],
            registry=r,
        )
        self.update_norm = Gauge(
            "reclra_layer_update_norm",
            "Norm of the applied update",
            ["run", "stage", "layer"],
            registry=r,
        )
        self.synapse_angle = Gauge(
            "reclra_layer_synapse_angle_degrees",
            "Angle between a layer's error synapse E and its forward weight W: 0 is exact "
            "transport (E = W^T), 90 no alignment",
            ["run", "stage", "layer"],
            registry=r,
        )
        self.start_angle = Gauge(
            "reclra_layer_synapse_angle_at_start_degrees",
            "Angle between a layer's error synapse E and its forward weight W at the first "
            "training step, after the weight-mirror phase (rule.mirror_angle)",
            ["run", "stage", "layer"],
            registry=r,
        )
        self.mirror = Counter(
            "reclra_stage_mirror_seconds",
            "Time a stage spent in weight-mirror steps (the phase before training, and any "
            "interleaved ones)",
            ["run", "stage"],
            registry=r,
        )
        self.backprop_cosine = Gauge(
            "reclra_layer_backprop_cosine",
            "Cosine between a layer's local update and backprop's gradient of the same "
            "micro-batches, at the last probe (train.diagnose_every)",
            ["run", "stage", "layer"],
            registry=r,
        )
        self.val_acc = Gauge(
            "reclra_validation_accuracy_ratio", "Validation accuracy", ["run"], registry=r
        )
        self.test_acc = Gauge("reclra_test_accuracy_ratio", "Test accuracy", ["run"], registry=r)
        self.exit_val_acc = Gauge(
            "reclra_stage_exit_validation_accuracy_ratio",
            "Validation accuracy of a stage's early exit (decoupled runs: its auxiliary head; "
            "the top stage's is the model's)",
            ["run", "stage"],
            registry=r,
        )
        self.exit_test_acc = Gauge(
            "reclra_stage_exit_test_accuracy_ratio",
            "Test accuracy of a stage's early exit (decoupled runs: its auxiliary head; the "
            "top stage's is the model's)",
            ["run", "stage"],
            registry=r,
        )
        self.checkpoints = Counter("reclra_checkpoints", "Checkpoints written", ["run"], registry=r)
        self.last_checkpoint = Gauge(
            "reclra_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint",
            ["run"],
            registry=r,
        )
        self.restarts = Counter("reclra_restarts", "Stage recoveries", ["run"], registry=r)
        self.stage_count = Gauge(
            "reclra_stages",
            "Stages the run trains on now (fewer than asked while pipeline.elastic has shrunk it)",
            ["run"],
            registry=r,
        )

    # -- recording ----------------------------------------------------------------------------
    def series(self, metric: M, run: str, *rest: str) -> M:
        """`metric`'s child for run `run` (and `rest`: stage, layer), remembered as the run's."""
        values = (run, *rest)
        with self._lock:
            self._series.setdefault(run, set()).add((metric, values))
        return metric.labels(*values)

    def register_run(self, run: str) -> None:
        """Export the run's counters at 0 from the start (a counter absent until its first
        increment breaks rate() and alert rules)."""
        for counter in (self.steps, self.samples, self.checkpoints, self.restarts):
            self.series(counter, run)
        self.set_state(run, "pending")

    def forget_run(self, run: str) -> None:
        """Remove every series of `run` (the service no longer holds it: its files stay)."""
        with self._lock:
            series = self._series.pop(run, set())
        for metric, values in series:
            with contextlib.suppress(KeyError):  # already gone
                metric.remove(*values)

    def set_state(self, run: str, state: str) -> None:
        self.series(self.state, run).state(state)

    def step(self, run: str, seconds: float, samples: int) -> None:
        self.series(self.steps, run).inc()
        self.series(self.samples, run).inc(samples)
        self.series(self.step_seconds, run).observe(seconds)

    def stages(self, run: str, reports: list[tuple[int, StageStats]]) -> None:
        for stage, st in reports:
            s = str(stage)
            self.series(self.forward, run, s).inc(st.forward_seconds)
            self.series(self.learn, run, s).inc(st.learn_seconds)
            self.series(self.idle, run, s).inc(st.idle_seconds)
            self.series(self.received, run, s).inc(st.bytes_received)
            self.series(self.in_flight, run, s).set(st.cached)
            self.series(self.cached_bytes, run, s).set(st.cached_bytes)
            if st.staleness:
                self.series(self.staleness, run, s).set(sum(st.staleness) / len(st.staleness))
            for gauge, values in (
                (self.local_loss, st.local_loss),
                (self.update_norm, st.update_norm),
                (self.synapse_angle, st.synapse_angle),
                (self.start_angle, st.start_angle),
                (self.backprop_cosine, st.backprop_cosine),  # {} between probes: keeps the last
            ):
                for layer, v in values.items():
                    self.series(gauge, run, s, layer).set(v)
            self.series(self.mirror, run, s).inc(st.mirror_seconds)

    def accuracy(self, run: str, split: str, acc: float) -> None:
        """The run's accuracy on `split` ("val" or "test")."""
        self.series(self.val_acc if split == "val" else self.test_acc, run).set(acc)

    def exits(self, run: str, split: str, accs: Sequence[float]) -> None:
        """The early-exit accuracy of each stage (stage order) on `split` ("val" or "test")."""
        gauge = self.exit_val_acc if split == "val" else self.exit_test_acc
        for stage, acc in enumerate(accs):
            self.series(gauge, run, str(stage)).set(acc)

    def set_stages(self, run: str, k: int) -> None:
        self.series(self.stage_count, run).set(k)

    def checkpoint(self, run: str) -> None:
        self.series(self.checkpoints, run).inc()
        self.series(self.last_checkpoint, run).set(time.time())

    def restart(self, run: str) -> None:
        self.series(self.restarts, run).inc()


class MetricsServer:
    """/metrics over HTTP for a registry; port 0 picks a free port (see .port)."""

    def __init__(self, metrics: Metrics, addr: str = "127.0.0.1", port: int = 0) -> None:
        self.server, self.thread = start_http_server(port, addr=addr, registry=metrics.registry)
        self.addr, self.port = addr, self.server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
