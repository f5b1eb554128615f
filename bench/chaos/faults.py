"""The faults bench.chaos injects into a live run: signals to a stage's worker process, and a
checkpoint location that runs out of space (a small tmpfs filled up, or, where mounting is not
allowed, bench.faults' enospc:// filesystem failing the next checkpoint write)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import ray


def actor_pid(actor: Any, timeout_s: float = 60.0) -> int:
    """The pid of the worker process behind a Ray actor (as bench.service and the tests find it)."""
    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=timeout_s))


def is_ray_worker(pid: int) -> bool:
    """Whether `pid` is (still) a Ray worker process: signals only ever go to those."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.startswith(b"ray::")


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def signal_worker(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to a Ray worker process; refuse anything else (a reused pid, say)."""
    if not is_ray_worker(pid):
        raise RuntimeError(f"pid {pid} is not a Ray worker process; not sending {sig.name}")
    os.kill(pid, sig)


class Stopped:
    """SIGSTOPped worker processes, continued (and, if they then linger, killed) on release():
    nothing is ever left stopped, also when the soak fails (use it as a context manager)."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def stop(self, pid: int) -> None:
        self.pids.append(pid)
        signal_worker(pid, signal.SIGSTOP)

    def release(self, wait_s: float = 15.0) -> list[int]:
        """SIGCONT every stopped process, wait for Ray to end it; SIGKILL what is left after
        `wait_s`. Returns the pids this had to kill itself."""
        pids, self.pids = self.pids, []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + wait_s
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = [p for p in pids if alive(p) and is_ray_worker(p)]
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return killed

    def __enter__(self) -> Stopped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SmallDisk:
    """A tmpfs of `size_bytes` mounted at `path` (needs the right to mount: root, or
    CAP_SYS_ADMIN), which fill() makes all but full and free() empties again."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "reclra-chaos", str(self.path)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.filler = self.path / ".filler"

    @staticmethod
    def allowed(probe: Path) -> bool:
        """Whether a tmpfs can be mounted here (tried on `probe`, then unmounted)."""
        try:
            SmallDisk(probe, 1 << 20).close()
        except (OSError, subprocess.CalledProcessError):
            return False
        return True

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int = 4096) -> int:
        """Take all but `leave_bytes` of the free space; returns the bytes left free."""
        size = max(self.free_bytes() - leave_bytes, 0)
        with open(self.filler, "wb") as f:
            chunk = b"\0" * (1 << 20)
            while size > 0:
                try:
                    size -= f.write(chunk[: min(size, len(chunk))])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return self.free_bytes()

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmount (lazily, should something still hold a file open); idempotent."""
        self.free()
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FullStore:
    """Where no tmpfs can be mounted: the run's outputs go to bench.faults' enospc:// (memory
    underneath), and fill() makes its next checkpoint write fail with OSError(ENOSPC). The same
    fill() / free() / close() as SmallDisk."""

    protocol = "enospc"

    def __init__(self) -> None:
        from bench.faults import FullFileSystem

        self.fs = FullFileSystem

    def fill(self) -> None:
        self.fs.fail_next(1, "/checkpoints/")

    def free(self) -> None:
        self.fs.reset()

    def close(self) -> None:
        self.fs.reset()


def names(where: str | Path) -> list[str]:
    """The file names in a local directory or under a URI."""
    if isinstance(where, Path):
        return sorted(p.name for p in where.iterdir())
    import fsspec

    fs, path = fsspec.core.url_to_fs(where)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
