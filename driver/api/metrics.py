"""Prometheus metrics for runs: the only prometheus_client importer, and the /metrics endpoint."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

from workers.spec import StageStats

# reclra_run_state's values, in lifecycle order (a gauge: labels stay run / stage / layer).
STATE_CODES = {
    "pending": 0,
    "starting": 1,
    "running": 2,
    "checkpointing": 3,
    "recovering": 4,
    "succeeded": 5,
    "failed": 6,
    "stopped": 7,
}


class Metrics:
    """Every metric the service exports, in its own registry. Names: prefix reclra_, base
    units; labels: run, stage, layer only."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.build = Info("reclra_build", "reclra build information", registry=r)
        self.build.info(
            {
                "version": _version("reclra"),
                "torch": _version("torch"),
                "ray": _version("ray"),
                "python": platform.python_version(),
            }
        )
        self.state = Gauge(
            "reclra_run_state",
            "Run state: " + ", ".join(f"{v}={k}" for k, v in STATE_CODES.items()),
            ["run"],
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
    def register_run(self, run: str) -> None:
        """Export the run's counters at 0 from the start (a counter absent until its first
        increment breaks rate() and alert rules)."""
        for counter in (self.steps, self.samples, self.checkpoints, self.restarts):
            counter.labels(run)
        self.set_state(run, "pending")

    def set_state(self, run: str, state: str) -> None:
        self.state.labels(run).set(STATE_CODES[state])

    def step(self, run: str, seconds: float, samples: int) -> None:
        self.steps.labels(run).inc()
        self.samples.labels(run).inc(samples)
        self.step_seconds.labels(run).observe(seconds)

    def stages(self, run: str, reports: list[tuple[int, StageStats]]) -> None:
        for stage, st in reports:
            s = str(stage)
            self.forward.labels(run, s).inc(st.forward_seconds)
            self.learn.labels(run, s).inc(st.learn_seconds)
            self.idle.labels(run, s).inc(st.idle_seconds)
            self.received.labels(run, s).inc(st.bytes_received)
            self.in_flight.labels(run, s).set(st.cached)
            self.cached_bytes.labels(run, s).set(st.cached_bytes)
            if st.staleness:
                self.staleness.labels(run, s).set(sum(st.staleness) / len(st.staleness))
            for layer, v in st.local_loss.items():
                self.local_loss.labels(run, s, layer).set(v)
            for layer, v in st.update_norm.items():
                self.update_norm.labels(run, s, layer).set(v)
            for layer, v in st.synapse_angle.items():
                self.synapse_angle.labels(run, s, layer).set(v)
            for layer, v in st.start_angle.items():
                self.start_angle.labels(run, s, layer).set(v)
            self.mirror.labels(run, s).inc(st.mirror_seconds)
            for layer, v in st.backprop_cosine.items():  # {} between probes: keeps the last
                self.backprop_cosine.labels(run, s, layer).set(v)

    def exits(self, run: str, split: str, accs: Sequence[float]) -> None:
        """The early-exit accuracy of each stage (stage order) on `split` ("val" or "test")."""
        gauge = self.exit_val_acc if split == "val" else self.exit_test_acc
        for stage, acc in enumerate(accs):
            gauge.labels(run, str(stage)).set(acc)

    def set_stages(self, run: str, k: int) -> None:
        self.stage_count.labels(run).set(k)

    def checkpoint(self, run: str) -> None:
        self.checkpoints.labels(run).inc()
        self.last_checkpoint.labels(run).set(time.time())


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
