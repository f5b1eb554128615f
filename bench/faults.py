"""Storage faults for benchmarks: `enospc://`, an in-memory fsspec filesystem whose writes fail
with OSError(ENOSPC) on demand, as a full disk or a bucket over quota would.

    import bench.faults                       # registers enospc://
    bench.faults.FullFileSystem.fail_next(2)  # the next two writes fail (-1: every write)
    Controller(cfg, out_dir="enospc://chaos/run")

Its files live in its own store (not memory://'s), shared by every instance in the process.
`fail_next(n, match="/checkpoints/")` fails only writes whose path contains `match`. In a
subprocess, RECLRA_ENOSPC_WRITES=N (and RECLRA_ENOSPC_MATCH) arm it at import, and
`python -m bench.faults train ...` is `reclra train ...` with enospc:// registered.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

PROTOCOL = "enospc"
WRITE_MODES = set("wax+")


class FullFileSystem(MemoryFileSystem):  # type: ignore[misc]
    """memory:// with a budget of writes to refuse with ENOSPC (every write path: open for
    writing, pipe_file, put and copy go through _open or pipe_file)."""

    protocol = (PROTOCOL,)
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    _lock = threading.Lock()
    _fail = 0  # writes still to refuse; -1: all of them
    _match = ""
    refused: ClassVar[list[str]] = []  # the paths refused so far

    @classmethod
    def fail_next(cls, n: int = 1, match: str = "") -> None:
        """Refuse the next `n` writes (-1: every write until reset) whose path has `match`."""
        with cls._lock:
            cls._fail, cls._match = n, match

    @classmethod
    def reset(cls, *, clear: bool = False) -> None:
        """Stop refusing writes (and, with `clear`, forget every file and refusal)."""
        with cls._lock:
            cls._fail, cls._match = 0, ""
            if clear:
                cls.store.clear()
                cls.pseudo_dirs[:] = [""]
                cls.refused.clear()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str):
            path = path.removeprefix(f"{PROTOCOL}://")
        return super()._strip_protocol(path)

    def _refuse(self, path: str) -> None:
        cls = type(self)
        with cls._lock:
            if cls._fail == 0 or cls._match not in path:
                return
            if cls._fail > 0:
                cls._fail -= 1
            cls.refused.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{PROTOCOL}://{path}")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if WRITE_MODES & set(mode):
            self._refuse(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        self._refuse(self._strip_protocol(path))
        super().pipe_file(path, value, mode, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        self._refuse(self._strip_protocol(path2))
        super().cp_file(path1, path2, **kwargs)


fsspec.register_implementation(PROTOCOL, FullFileSystem, clobber=True)
if os.environ.get("RECLRA_ENOSPC_WRITES"):
    FullFileSystem.fail_next(
        int(os.environ["RECLRA_ENOSPC_WRITES"]), os.environ.get("RECLRA_ENOSPC_MATCH", "")
    )


if __name__ == "__main__":
    from driver.cli import main

    sys.exit(main(sys.argv[1:]))
