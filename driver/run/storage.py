"""Where a run's outputs live: a local path, or any fsspec URI (s3://, gs://, memory://, ...).

A plain path (or file://) stays a `Path` and is written as before: temp file, fsync, rename.
Any other URI is a string, written through fsspec. Every call has a deadline; transient errors
(timeouts, dropped connections, 5xx answers) are retried with exponential backoff, logged;
the rest (no permission, no space, no bucket) fail at once with one line naming the location
and the fix. Options and credentials come from the environment, never from the config (it is
stored in every checkpoint): AWS_* (AWS_ENDPOINT_URL for an S3-compatible server), Google's
application default credentials, or fsspec's own config (FSSPEC_S3_ENDPOINT_URL=..., files
in FSSPEC_CONFIG_DIR). RECLRA_STORAGE_ATTEMPTS (default 5) and RECLRA_STORAGE_DEADLINE_S
(default 60, plus a second per 4 MB written) bound the retries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import fsspec.config

from driver.config.locations import CheckpointError, Location, location

log = logging.getLogger(__name__)
T = TypeVar("T")
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "memory")
RATE = 4 * 2**20  # bytes per second of deadline added to each write
FATAL_ERRNO = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "over its disk quota",
    errno.EROFS: "read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
TRANSIENT_ERRNO = {errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.EAGAIN}
TRANSIENT_ERRNO |= {errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED}
TRANSIENT_ERRNO |= {errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}
# network errors of the object-store clients that are not OSErrors (matched by class name)
TRANSIENT_NAMES = {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError"}
TRANSIENT_NAMES |= {"ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError"}
TRANSIENT_NAMES |= {"IncompleteRead", "ClientPayloadError", "ClientConnectionError"}
TRANSIENT_NAMES |= {"ServerDisconnectedError", "FSTimeoutError"}


def is_remote(where: Location) -> bool:
    return isinstance(where, str)


def join(base: str | Path, *parts: str) -> Location:
    where = location(base)
    if isinstance(where, Path):
        return where.joinpath(*parts)
    return "/".join([where, *parts])


def name(where: Location) -> str:
    return where.name if isinstance(where, Path) else where.rsplit("/", 1)[-1]


def describe(where: Location) -> str:
    """Where outputs went, for a log line: a URI as is, a local path absolute with the host."""
    if isinstance(where, Path):
        return f"{where.resolve()} on host {socket.gethostname()}"
    return where


# -- calls with a deadline, retried when transient ---------------------------------------------
def attempts() -> int:
    return max(1, int(os.environ.get("RECLRA_STORAGE_ATTEMPTS", "5")))


def deadline_s(nbytes: int = 0) -> float:
    return float(os.environ.get("RECLRA_STORAGE_DEADLINE_S", "60")) + nbytes / RATE


def transient(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNO
    return any(c.__name__ in TRANSIENT_NAMES for c in type(exc).__mro__)


def _fatal(what: str, where: Location, exc: BaseException) -> CheckpointError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there or set train.out_dir to a larger volume or bucket"
    elif isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in FATAL_ERRNO
    ):
        fix = "grant write access (credentials come from the environment) or choose another "
        fix += "train.out_dir"
    elif isinstance(exc, FileNotFoundError):
        fix = "create the bucket or directory first, or fix train.out_dir"
    else:
        fix = "check train.out_dir and the storage's credentials"
    return CheckpointError(f"storage: cannot {what} {where} ({reason}); {fix}")


def call(what: str, where: Location, fn: Callable[[], T], *, nbytes: int = 0) -> T:
    """`fn()` under a deadline, retried with backoff while its errors are transient."""
    tries, limit = attempts(), deadline_s(nbytes)
    for attempt in range(1, tries + 1):
        try:
            return _with_deadline(fn, limit)
        except BaseException as exc:
            if not transient(exc):
                if isinstance(exc, OSError):
                    raise _fatal(what, where, exc) from exc
                raise
            err = exc
        if attempt == tries:
            raise CheckpointError(
                f"storage: cannot {what} {where} after {tries} attempts ({_short(err)}); check "
                "that the storage is reachable, or raise RECLRA_STORAGE_ATTEMPTS"
            ) from err
        pause = min(0.5 * 2 ** (attempt - 1), 8.0)
        retry = f"retry {attempt} of {tries - 1} in {pause:.1f} s"
        log.warning("storage: %s %s failed (%s); %s", what, where, _short(err), retry)
        time.sleep(pause)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """Run `fn` in a daemon thread; a call that outlives `seconds` raises TimeoutError (the
    thread is left to finish or fail on its own: Python cannot stop it)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=run, name="reclra-storage", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


# -- operations --------------------------------------------------------------------------------
def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it). S3 gets one attempt per call from botocore and
    s3fs, so that retries happen (and are logged) here only, unless fsspec's config says
    otherwise."""
    options: dict[str, Any] = {}
    s3 = uri.partition("://")[0] in ("s3", "s3a")
    if s3 and "config_kwargs" not in fsspec.config.conf.get("s3", {}):
        options["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if s3:
        fs.retries = 1  # s3fs's own loop over network errors (a class attribute, not an option)
    return fs, path


def write_bytes(where: Location, data: bytes) -> None:
    """Publish `data` at `where` whole or not at all: locally a temp file, fsync and rename;
    elsewhere one upload (an object store makes it visible only once complete)."""
    if isinstance(where, Path):
        call("write", where, lambda: _write_local(where, data), nbytes=len(data))
        return
    fs, path = filesystem(where)

    def put() -> None:
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError:  # a missing bucket stays an error; a missing directory
            if where.partition("://")[0] in OBJECT_STORES:  # (sftp, hdfs, ...) is made
                raise
            fs.makedirs(fs._parent(path), exist_ok=True)
            fs.pipe_file(path, data)

    call("write", where, put, nbytes=len(data))


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_bytes(where: Location) -> bytes:
    if isinstance(where, Path):
        return call("read", where, where.read_bytes)
    fs, path = filesystem(where)
    return call("read", where, lambda: fs.cat_file(path))  # type: ignore[no-any-return]


def listdir(where: Location) -> dict[str, int]:
    """{name: size} of the files directly in a directory or prefix; {} when there is none."""
    if isinstance(where, Path):
        if not where.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in where.iterdir() if p.is_file()}
    fs, path = filesystem(where)

    def ls() -> dict[str, int]:
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {
            e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    return call("list", where, ls)


def kind(where: Location) -> str:
    """'dir', 'file' or 'none'."""
    if isinstance(where, Path):
        return "dir" if where.is_dir() else "file" if where.is_file() else "none"
    fs, path = filesystem(where)

    def probe() -> str:
        fs.invalidate_cache(path)
        return "file" if fs.isfile(path) else "dir" if fs.isdir(path) else "none"

    return call("look up", where, probe)


def files_under(where: Location) -> list[Location]:
    """Every file in a directory or prefix and the folders below it, sorted; [] when none."""
    if isinstance(where, Path):
        return sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else []
    fs, path = filesystem(where)
    protocol = where.partition("://")[0]

    def find() -> list[Location]:
        fs.invalidate_cache(path)
        found = fs.find(path) if fs.isdir(path) else []
        return sorted(f"{protocol}://{p.lstrip('/')}" for p in found)

    return call("list", where, find)


def delete_tree(where: Location) -> None:
    """Remove a directory or prefix and everything below it; one already gone is fine."""
    if isinstance(where, Path):
        local = where

        def rmtree() -> None:
            if local.exists():
                shutil.rmtree(local)

        call("delete", where, rmtree)
        return
    fs, path = filesystem(where)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)

    call("delete", where, rm)


def delete(where: Location) -> None:
    """Remove a file; one already gone is fine."""
    if isinstance(where, Path):
        call("delete", where, lambda: where.unlink(missing_ok=True))
        return
    fs, path = filesystem(where)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    call("delete", where, rm)
