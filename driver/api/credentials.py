"""What the service and its clients authenticate with: PEM files (TLS, mutual TLS) read with a
one-line error naming the key and the file, the rule that the bearer token never travels in
clear off loopback, and the token source, which reads a token file again when it changes (a
rotated Kubernetes Secret) so the new token is accepted and the old one refused without a
restart. No grpc here: driver/api/service.py builds the gRPC credentials from these bytes."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from driver.config import ConfigError
from driver.config.service import ServiceConfig, TokenMissing

log = logging.getLogger(__name__)
PEM_MARKERS = {"certificate": b"-----BEGIN CERTIFICATE-----", "private key": b"PRIVATE KEY-----"}


def read_pem(key: str, path: str | Path | bytes, kind: str) -> bytes:
    """The PEM bytes at `path` (or `path` itself when given as bytes), checked to hold a `kind`
    ("certificate" or "private key"); ConfigError naming `key` and the file otherwise."""
    if isinstance(path, bytes):
        data, where = path, "the bytes given"
    else:
        where = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot read {where} ({exc.strerror or exc}); point it at a readable "
                f"PEM {kind} file"
            ) from None
    if PEM_MARKERS[kind] not in data:
        raise ConfigError(f"{key}: {where} holds no PEM {kind}; give a PEM-encoded {kind}")
    return data


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS material: its certificate chain and key, and the CA its clients'
    certificates must chain to (None: clients need no certificate)."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def server_tls(cfg: ServiceConfig) -> ServerTls | None:
    """The TLS material cfg names, read now (None when TLS is off)."""
    if not cfg.tls:
        return None
    client_ca = (
        read_pem("service.client_ca", cfg.client_ca, "certificate") if cfg.client_ca else None
    )
    return ServerTls(
        cert=read_pem("service.tls_cert", cfg.tls_cert, "certificate"),
        key=read_pem("service.tls_key", cfg.tls_key, "private key"),
        client_ca=client_ca,
    )


def is_loopback(addr: str) -> bool:
    """Whether `addr` (a host to bind) is loopback only: 127.0.0.0/8, ::1 or localhost."""
    host = addr.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve anywhere


def check_transport(cfg: ServiceConfig) -> None:
    """Refuse plain text off loopback (the bearer token would travel in clear) unless
    service.allow_insecure says so."""
    if cfg.tls or is_loopback(cfg.addr):
        return
    if not cfg.allow_insecure:
        raise ConfigError(
            f"service.addr {cfg.addr} is not loopback and TLS is off: the bearer token would "
            "travel in clear; set service.tls_cert and service.tls_key, or "
            "service.allow_insecure = true"
        )
    log.warning(
        "service.addr %s is not loopback and TLS is off (service.allow_insecure): the bearer "
        "token travels in clear",
        cfg.addr,
    )


class TokenSource:
    """The bearer token the service accepts now: a fixed one, or the content of a file (a
    mounted Secret), stripped of surrounding whitespace.

    A file is stat'ed on every call and read again when its inode, size or mtime changed, and
    at least once a second whatever they say (a rewrite within one mtime tick that keeps the
    size). A file that later goes missing or empty keeps the last token, with a warning: that
    is a rewrite in progress, not a revocation (to revoke, write a new token)."""

    def __init__(self, token: str = "", *, path: str = "", recheck_s: float = 1.0) -> None:
        if bool(token) == bool(path):
            raise ValueError("TokenSource: give a token or a path, not both nor neither")
        self.path, self.recheck_s = path, recheck_s
        self._token = token.encode()
        self._sig: tuple[int, int, int] | None = None
        self._read_at = -float("inf")
        self._lock = threading.Lock()
        if path:
            self._sig = self._stat()
            fix = "write the bearer token there (or mount its Secret), or set service.token"
            try:
                token_now = Path(path).read_bytes().strip()
            except OSError as exc:
                raise TokenMissing(
                    f"service.token_file: cannot read {path} ({exc.strerror or exc}); {fix}"
                ) from None
            if not token_now:
                raise TokenMissing(f"service.token_file: {path} is empty; {fix}")
            self._token, self._read_at = token_now, time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> bytes:
        try:
            return Path(self.path).read_bytes().strip()
        except OSError:
            return b""

    def current(self) -> bytes:
        """The token, as bytes (for hmac.compare_digest)."""
        if not self.path:
            return self._token
        sig, now = self._stat(), time.monotonic()
        if sig == self._sig and now - self._read_at < self.recheck_s:
            return self._token
        with self._lock:
            if sig != self._sig or now - self._read_at >= self.recheck_s:
                token = self._read()  # after the stat: a later change shows as a new signature
                if token:
                    if token != self._token:
                        log.info("service.token_file %s: a new bearer token", self.path)
                    self._token = token
                elif sig != self._sig:
                    log.warning(
                        "service.token_file %s is missing or empty; the last token stays",
                        self.path,
                    )
                self._sig, self._read_at = sig, now
            return self._token


def token_source(cfg: ServiceConfig) -> TokenSource:
    """service.token, else service.token_file (read again as it changes), else the
    service.token_env variable; TokenMissing when none holds a token."""
    if cfg.token:
        return TokenSource(cfg.token)
    if cfg.token_file:
        return TokenSource(path=cfg.token_file)
    token = os.environ.get(cfg.token_env, "")
    if not token:
        raise TokenMissing(
            f"service: no bearer token; set service.token, service.token_file or the "
            f"{cfg.token_env} environment variable"
        )
    return TokenSource(token)
