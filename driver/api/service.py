"""`reclra serve`: the gRPC control API over training runs (the only grpc importer)."""

from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from driver.api import reclra_pb2 as _pb
from driver.api.metrics import Metrics
from driver.api.service_config import ServiceConfig
from driver.config import Config, ConfigError, parse_config
from driver.run.callbacks import Callback, RunState, RunView
from driver.run.controller import Controller, RunFailed
from driver.run.progress import Progress

log = logging.getLogger(__name__)
SERVICE = "reclra.v1.Training"
# rpc name -> (request message, response message, server-streaming); mirrors reclra.proto
METHODS = {
    "StartRun": ("StartRunRequest", "Run", False),
    "GetRun": ("GetRunRequest", "Run", False),
    "ListRuns": ("ListRunsRequest", "ListRunsResponse", False),
    "StopRun": ("StopRunRequest", "Run", False),
    "WatchRun": ("WatchRunRequest", "RunEvent", True),
}
TERMINAL_STATES = {s.value for s in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)}
pb: Any = _pb  # generated messages carry no static types


class RunHandle(Callback):
    """One run: its controller stepping in a thread, and a version counter watchers wait on
    (bumped by the controller's every transition: this handle is one of its callbacks)."""

    def __init__(self, run_id: str, cfg: Config, out: Path, metrics: Metrics | None) -> None:
        self.run_id = run_id
        self.version = 0
        self.cond = threading.Condition()
        self.ctl = Controller(
            cfg, out_dir=out, metrics=metrics, run_id=run_id, callbacks=[Progress(), self]
        )
        self.thread = threading.Thread(target=self._drive, name=f"run-{run_id}", daemon=True)

    def after_transition(self, ctl: RunView, previous: RunState, current: RunState) -> None:
        self._bump()

    def _drive(self) -> None:
        try:
            self.ctl.run_to_end()
        except RunFailed:
            pass  # the controller logged it; GetRun and WatchRun report its state and error
        finally:
            self._bump()

    def _bump(self) -> None:
        with self.cond:
            self.version += 1
            self.cond.notify_all()

    def snapshot(self) -> Any:
        c = self.ctl
        last = c.run.epochs[-1] if c.run.epochs else {}
        per_epoch = 0
        if c.splits is not None:
            per_epoch = -(-len(c.splits.train) // c.cfg.train.batch_size)  # type: ignore[arg-type]
        total = c.cfg.train.epochs * per_epoch
        if c.cfg.train.max_steps:
            total = min(total, c.cfg.train.max_steps) if total else c.cfg.train.max_steps
        return pb.Run(
            run_id=self.run_id,
            state=c.state.value,
            step=c.run.steps,
            total_steps=total,
            epoch=c.pos.epoch,
            val_acc=last.get("val_acc", 0.0),
            test_acc=c.run.test_acc or 0.0,
            restarts=c.restarts,
            error=c.error or "",
            out_dir=str(c.out),
        )


class Runs:
    """The runs this service started."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.lock = threading.Lock()
        self.runs: dict[str, RunHandle] = {}

    def start(self, text: str, overrides: list[str], run_id: str) -> RunHandle:
        cfg = parse_config(text, overrides, source="the request's config_toml")
        run_id = run_id or uuid.uuid4().hex[:12]
        with self.lock:
            if run_id in self.runs:
                raise ConfigError(f"run_id {run_id!r} exists; pick another or leave it empty")
            out = Path(self.cfg.runs_dir) / run_id
            cfg = replace(cfg, train=replace(cfg.train, compare=()))
            handle = self.runs[run_id] = RunHandle(run_id, cfg, out, self.metrics)
        handle.thread.start()
        return handle

    def get(self, run_id: str, context: grpc.ServicerContext) -> RunHandle:
        with self.lock:
            handle = self.runs.get(run_id)
        if handle is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no run {run_id!r}; ListRuns shows them")
        return handle  # type: ignore[return-value]


class Servicer:
    def __init__(self, runs: Runs, interval: float) -> None:
        self.runs, self.interval = runs, interval

    def StartRun(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            handle = self.runs.start(request.config_toml, list(request.overrides), request.run_id)
        except (ConfigError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return handle.snapshot()

    def GetRun(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self.runs.get(request.run_id, context).snapshot()

    def ListRuns(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.runs.lock:
            handles = list(self.runs.runs.values())
        return pb.ListRunsResponse(runs=[h.snapshot() for h in handles])

    def StopRun(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        handle = self.runs.get(request.run_id, context)
        handle.ctl.request_stop()
        return handle.snapshot()

    def WatchRun(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        handle = self.runs.get(request.run_id, context)
        seen = -1
        while context.is_active():
            with handle.cond:
                if handle.version == seen:
                    handle.cond.wait(timeout=1.0)
                version = handle.version
            if version == seen:
                continue
            seen = version
            snap = handle.snapshot()
            yield pb.RunEvent(run=snap)
            if snap.state in TERMINAL_STATES:
                return
            time.sleep(self.interval)  # coalesce: many watchers must not slow the run


def _handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    """The service's method handlers, built from METHODS (only the messages are generated)."""
    handlers = {}
    for name, (req, resp, stream) in METHODS.items():
        make = (
            grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = make(
            getattr(servicer, name),
            request_deserializer=getattr(pb, req).FromString,
            response_serializer=getattr(pb, resp).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class _BearerAuth(grpc.ServerInterceptor):
    """Every call but the health check must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.token = token.encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata authorization: Bearer ...)",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        sent = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(sent.encode(), b"Bearer " + self.token):
            return continuation(details)
        return self._deny_stream if details.method.endswith("/WatchRun") else self._deny


class Service:
    """A running gRPC server (bound to cfg.addr:cfg.port) with the health service."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None = None) -> None:
        token = cfg.resolved_token()
        self.runs = Runs(cfg, metrics)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
            interceptors=[_BearerAuth(token)],
        )
        self.server.add_generic_rpc_handlers(
            (_handlers(Servicer(self.runs, cfg.watch_interval_s)),)
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{cfg.addr}:{cfg.port}")
        if self.port == 0:
            raise ConfigError(
                f"service: cannot bind {cfg.addr}:{cfg.port}; pick another "
                "service.port or free that one"
            )
        self.server.start()
        for name in (SERVICE, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d", SERVICE, cfg.addr, self.port)

    def stop(self, grace: float = 5.0) -> None:
        for name in (SERVICE, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        with self.runs.lock:
            handles = list(self.runs.runs.values())
        for h in handles:
            h.ctl.request_stop()
        for h in handles:
            h.thread.join(timeout=60)
        self.server.stop(grace).wait()


class Client:
    """A small client for the API (tests, scripts, the CLI): adds the bearer token."""

    def __init__(self, target: str, token: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.rpcs = {
            name: (self.channel.unary_stream if stream else self.channel.unary_unary)(
                f"/{SERVICE}/{name}",
                request_serializer=getattr(pb, req).SerializeToString,
                response_deserializer=getattr(pb, resp).FromString,
            )
            for name, (req, resp, stream) in METHODS.items()
        }
        self.metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        return self.rpcs[method](request, metadata=self.metadata, timeout=timeout)

    def watch(self, run_id: str, timeout: float = 600.0) -> Any:
        return self.rpcs["WatchRun"](
            pb.WatchRunRequest(run_id=run_id), metadata=self.metadata, timeout=timeout
        )

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()


# re-exported for callers that must not import grpc themselves
StatusCode = grpc.StatusCode
RpcError = grpc.RpcError
messages = pb
