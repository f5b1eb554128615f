"""`reclra serve`: the gRPC control API over training runs (the only grpc importer)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from driver.api import reclra_pb2 as pb
from driver.api import reclra_pb2_grpc as pb_grpc
from driver.api.admission import OverBudget
from driver.api.credentials import (
    ServerTls,
    TokenSource,
    check_transport,
    read_pem,
    server_tls,
    token_source,
)
from driver.api.metrics import Metrics
from driver.api.runs import Closing, QueueFull, RunExists, RunHandle, Runs, UnknownRun
from driver.config import ConfigError
from driver.config.service import ServiceConfig
from driver.run.callbacks import RunState

log = logging.getLogger(__name__)
_TRAINING = pb.DESCRIPTOR.services_by_name["Training"]
SERVICE = _TRAINING.full_name  # reclra.v1.Training
# rpc name -> (request message, response message, server-streaming), read from the generated
# descriptor of reclra.proto (for tools that send raw bytes, e.g. bench.chaos)
METHODS = {
    m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in _TRAINING.methods
}
# what reflection lists: the API, the health check and reflection itself
REFLECTED = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
REFUSALS = (UnknownRun, QueueFull, OverBudget, Closing, ValueError)
TERMINAL_STATES = {s.value for s in (RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED)}


# the registry's refusals, as status codes (first match wins: the ValueErrors come last)
ERRORS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnknownRun, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverBudget, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Closing, grpc.StatusCode.UNAVAILABLE),
    (RunExists, grpc.StatusCode.ALREADY_EXISTS),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # RunRefused, ConfigError
)


MAX_DETAILS = 1024  # a status message quoting a huge value must stay under the client's limit


def clip(details: str) -> str:
    """A status message as one line of at most MAX_DETAILS characters: refusals quote what the
    request sent, which may be megabytes."""
    line = " ".join(details.split("\n"))
    return line if len(line) <= MAX_DETAILS else line[: MAX_DETAILS - 25] + " ... (message clipped)"


def _abort(context: grpc.ServicerContext, exc: Exception) -> NoReturn:
    code = next(code for kind, code in ERRORS if isinstance(exc, kind))
    context.abort(code, clip(str(exc)))
    raise AssertionError("unreachable: abort raises")


class Servicer(pb_grpc.TrainingServicer):
    """The Training service's methods, registered by the generated
    add_TrainingServicer_to_server."""

    def __init__(self, runs: Runs, interval: float) -> None:
        self.runs, self.interval = runs, interval

    def StartRun(  # noqa: N802
        self, request: pb.StartRunRequest, context: grpc.ServicerContext
    ) -> pb.Run:
        try:
            handle = self.runs.start(request.config_toml, list(request.overrides), request.run_id)
        except REFUSALS as exc:
            _abort(context, exc)
        except Exception as exc:  # a bug of ours, never UNKNOWN: the log has the traceback
            log.exception("StartRun failed on a request")
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"the service failed on this request ({type(exc).__name__}); its log has the "
                "traceback: report it",
            )
        return pb.Run(**handle.fields())

    def _get(self, run_id: str, context: grpc.ServicerContext) -> RunHandle:
        try:
            return self.runs.get(run_id)
        except REFUSALS as exc:
            _abort(context, exc)

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.Run:  # noqa: N802
        return pb.Run(**self._get(request.run_id, context).fields())

    def ListRuns(  # noqa: N802
        self, request: pb.ListRunsRequest, context: grpc.ServicerContext
    ) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[pb.Run(**h.fields()) for h in self.runs.all()])

    def StopRun(self, request: pb.StopRunRequest, context: grpc.ServicerContext) -> pb.Run:  # noqa: N802
        try:
            handle = self.runs.stop(request.run_id)
        except REFUSALS as exc:
            _abort(context, exc)
        return pb.Run(**handle.fields())

    def WatchRun(  # noqa: N802
        self, request: pb.WatchRunRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RunEvent]:
        handle = self._get(request.run_id, context)
        seen = -1
        while context.is_active():
            with handle.cond:
                if handle.version == seen:
                    handle.cond.wait(timeout=1.0)
                version = handle.version
            if version == seen:
                continue
            seen = version
            snap = pb.Run(**handle.fields())
            yield pb.RunEvent(run=snap)
            if snap.state in TERMINAL_STATES:
                return
            time.sleep(self.interval)  # coalesce: many watchers must not slow the run


def _request_name(method: str) -> str:
    """The request message's full name for a method path, e.g. reclra.v1.GetRunRequest."""
    service, _, name = method.strip("/").partition("/")
    if service == SERVICE and name in METHODS:
        return f"{pb.DESCRIPTOR.package}.{METHODS[name][0]}"
    return f"request of {method}"


def _decoding(deserialize: Callable[[bytes], Any], method: str) -> Callable[..., Any]:
    """deserialize, run inside the method's behaviour: a body that does not decode (a broken
    protobuf, invalid UTF-8 in a string field) is INVALID_ARGUMENT, where grpc's own
    deserializer would answer INTERNAL."""

    def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # protobuf's DecodeError, or UTF-8 decoding
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                clip(
                    f"the request is not a valid {_request_name(method)} "
                    f"({type(exc).__name__}: {exc}); send it as the .proto says, strings in UTF-8"
                ),
            )

    return decode


class _DecodeInBehaviour(grpc.ServerInterceptor):
    """Every unary-request method's handler (the generated ones, health's) with its request
    deserializer moved into its behaviour, so a body that does not decode gets
    INVALID_ARGUMENT with a message naming the message type."""

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = _decoding(handler.request_deserializer, details.method)
        if handler.response_streaming:
            behaviour = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda raw, context: behaviour(decode(raw, context), context),
                response_serializer=handler.response_serializer,
            )
        behaviour = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(
            lambda raw, context: behaviour(decode(raw, context), context),
            response_serializer=handler.response_serializer,
        )


class _BearerAuth(grpc.ServerInterceptor):
    """Every call but the health check must carry `authorization: Bearer <token>` (reflection
    included); the token is asked of its source on every call, so a rotated token file takes
    effect at once. A refused call gets UNAUTHENTICATED whether its method exists or not."""

    def __init__(self, token: str | TokenSource) -> None:
        self.source = TokenSource(token) if isinstance(token, str) else token

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata authorization: Bearer ...)",
            )

        def deny_stream(requests: Any, context: grpc.ServicerContext) -> None:
            deny(None, context)

        # a refusal in the method's own shape: (request streaming, response streaming)
        self._deny: dict[tuple[bool, bool], grpc.RpcMethodHandler[Any, Any]] = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
        }

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        sent = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(sent.encode(), b"Bearer " + self.source.current()):
            return continuation(details)
        handler = continuation(details)  # looked up only for its shape; never called
        if handler is None:
            return self._deny[False, False]
        return self._deny[handler.request_streaming, handler.response_streaming]


class Service:
    """A running gRPC server (bound to cfg.addr:cfg.port) with the health service."""

    def __init__(self, cfg: ServiceConfig, metrics: Metrics | None = None) -> None:
        check_transport(cfg)  # each refusal is one line, before anything is bound or started
        token = token_source(cfg)
        tls = server_tls(cfg)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers),
            interceptors=[_BearerAuth(token), _DecodeInBehaviour()],
            options=[("grpc.max_receive_message_length", cfg.max_request_bytes)],
        )
        self.port = self._bind(cfg.addr, cfg.port, tls)
        self.runs = Runs(cfg, metrics)
        pb_grpc.add_TrainingServicer_to_server(
            Servicer(self.runs, cfg.watch_interval_s), self.server
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(REFLECTED, self.server)
        self.server.start()
        for name in (SERVICE, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        mode = "plain text" if tls is None else "mutual TLS" if tls.client_ca else "TLS"
        log.info("serving %s on %s:%d (%s)", SERVICE, cfg.addr, self.port, mode)

    def _bind(self, addr: str, port: int, tls: ServerTls | None) -> int:
        """The port bound on addr: plain text, or TLS with tls's certificate (and client CA)."""
        host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
        try:
            if tls is None:
                bound = self.server.add_insecure_port(f"{host}:{port}")
            else:
                creds = grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)],
                    root_certificates=tls.client_ca,
                    require_client_auth=tls.client_ca is not None,
                )
                bound = self.server.add_secure_port(f"{host}:{port}", creds)
        except RuntimeError:  # newer grpc raises where older versions returned 0
            bound = 0
        if bound == 0 and tls is not None:
            raise ConfigError(
                f"service: cannot bind {addr}:{port} with TLS; check that service.tls_key is "
                "the private key of service.tls_cert, and that the port is free"
            )
        if bound == 0:
            raise ConfigError(
                f"service: cannot bind {addr}:{port}; pick another service.port or free that one"
            )
        return bound

    def stop(self, grace: float = 5.0) -> None:
        for name in (SERVICE, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.runs.close()  # pending runs end stopped; active ones checkpoint, then stop
        self.server.stop(grace).wait()


PemSource = str | Path | bytes
_UNARY = ", ".join(name for name, (_, _, stream) in METHODS.items() if not stream)


class Client:
    """A small client for the API (tests, scripts, the CLI): adds the bearer token.

    With `root_ca` (the CA, or the self-signed certificate, that signed the server's) the
    channel speaks TLS; `cert` and `key` add this client's certificate for mutual TLS;
    `server_name` overrides the name checked against the server's certificate (when `target`
    is an address the certificate does not name). `tls=True` speaks TLS against the system's
    CA roots. Each PEM is a path or the bytes themselves."""

    def __init__(
        self,
        target: str,
        token: str,
        *,
        root_ca: PemSource | None = None,
        cert: PemSource | None = None,
        key: PemSource | None = None,
        server_name: str | None = None,
        tls: bool | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise ValueError("Client: cert and key go together (mutual TLS); give both or neither")
        secure = tls if tls is not None else (root_ca is not None or cert is not None)
        if not secure and (root_ca is not None or cert is not None or server_name):
            raise ValueError("Client: root_ca, cert, key and server_name need TLS (tls=False)")
        if secure:
            creds = grpc.ssl_channel_credentials(
                root_certificates=None
                if root_ca is None
                else read_pem("Client root_ca", root_ca, "certificate"),
                private_key=None if key is None else read_pem("Client key", key, "private key"),
                certificate_chain=None
                if cert is None
                else read_pem("Client cert", cert, "certificate"),
            )
            options = [] if not server_name else [("grpc.ssl_target_name_override", server_name)]
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.TrainingStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        """A unary method of the service by its rpc name, e.g. call("GetRun", GetRunRequest)."""
        if method not in METHODS or METHODS[method][2]:
            raise ValueError(f"Client.call: no unary method {method!r}; one of {_UNARY}")
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def watch(self, run_id: str, timeout: float = 600.0) -> Iterator[pb.RunEvent]:
        """The run's events until it ends (or timeout seconds pass: DEADLINE_EXCEEDED)."""
        events: Iterator[pb.RunEvent] = self.stub.WatchRun(
            pb.WatchRunRequest(run_id=run_id), metadata=self.metadata, timeout=timeout
        )
        return events

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
