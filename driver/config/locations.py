"""Where outputs may go: a local path, or a URI whose fsspec protocol is known and installed.

The config checks a location here, before anything is written; driver/run/storage.py writes."""

from __future__ import annotations

from pathlib import Path

import fsspec

Location = Path | str  # a Path is local; a str is a URI with a (non-file) protocol
LOCAL = ("file", "local")


class CheckpointError(ValueError):
    """A checkpoint or run output that cannot be read or written: one line naming the
    location, what is wrong and the fix."""


def location(where: str | Path) -> Location:
    """`where` as a Location: a plain path or file:// URI becomes a Path, any other URI stays."""
    text = str(where)
    protocol, sep, rest = text.partition("://")
    if not sep or isinstance(where, Path):
        return Path(where)
    if protocol in LOCAL:
        return Path(rest)
    check_protocol(protocol, text)
    return text.rstrip("/")


def check_protocol(protocol: str, uri: str) -> None:
    """Refuse an unknown protocol, or one whose package is missing, before anything is written."""
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CheckpointError(
            f"storage: unknown protocol {protocol}:// in {uri}; use a local path, file://, "
            "s3://, gs://, memory:// or another fsspec protocol"
        ) from None
    except ImportError as exc:
        raise CheckpointError(
            f"storage: {uri} needs a package that is not installed ({exc}); "
            "install it (pip install 'reclra[cloud]' for s3fs and gcsfs)"
        ) from None
