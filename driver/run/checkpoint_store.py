"""Checkpoints: atomic, checksummed files with the config, units keyed by layer name.

In a local directory a checkpoint is published by renaming its finished temp file. In an
object store (any URI but file://) it is published by a marker written after it:
ckpt-<step>.pt, then ckpt-<step>.json. Readers trust only checkpoints whose marker exists and
whose checksum verifies; a newer one that fails is skipped, with a warning, for the one before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, overload

import torch

from driver.run import storage
from driver.run.storage import CheckpointError, Location

__all__ = ["CheckpointError", "check_compatible", "checkpoints", "load", "run_state", "save"]

log = logging.getLogger(__name__)
MAGIC = b"RECLRA-CKPT\n"
FORMAT = 1
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
# What must agree between a checkpoint and the run resuming it (the stage count may differ).
MUST_MATCH = ("model", "rule", "data")
_warned: set[str] = set()


def _step(where: Location) -> int:
    return int(NAME.match(storage.name(where)).group(1))  # type: ignore[union-attr]


def _marker(where: Location) -> Location:
    return storage.join(str(where)[: -len(".pt")] + ".json")


def _warn_once(where: Location, message: str) -> None:
    if str(where) not in _warned:
        _warned.add(str(where))
        log.warning("%s", message)


@overload
def save(directory: Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path: ...
@overload
def save(directory: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Location: ...
def save(directory: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Location:
    """Write `state` as ckpt-<step>.pt in `directory` (a path or URI) and publish it; then keep
    the newest `keep` published checkpoints (0 keeps all). Nothing older goes before the new one
    is published, and a local save never touches a file it did not just replace."""
    directory = storage.location(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    header = json.dumps(
        {"format": FORMAT, "sha256": digest, "bytes": len(payload), "step": step}
    ).encode()
    data = MAGIC + len(header).to_bytes(4, "big") + header + payload
    path = storage.join(directory, f"ckpt-{step:08d}.pt")
    if storage.is_remote(directory):
        marker = _marker(path)
        storage.delete(marker)  # a same-step checkpoint being replaced is unpublished first
        storage.write_bytes(path, data)
        note = {"format": FORMAT, "step": step, "sha256": digest, "size": len(data)}
        storage.write_bytes(marker, json.dumps(note).encode())
    else:
        storage.write_bytes(path, data)
    if keep:
        _prune(directory, keep, step)
    return path


def _prune(directory: Location, keep: int, newest: int) -> None:
    for old in checkpoints(directory)[:-keep]:
        if storage.is_remote(old):
            storage.delete(_marker(old))  # unpublish, then delete
        storage.delete(old)
    if storage.is_remote(directory):  # uploads that never got their marker, now superseded
        names = storage.listdir(directory)
        for n in names:
            m = NAME.match(n)
            if m and int(m.group(1)) < newest and n[: -len(".pt")] + ".json" not in names:
                storage.delete(storage.join(directory, n))


def checkpoints(directory: str | Path) -> list[Location]:
    """The published checkpoints in `directory`, oldest step first (in an object store: those
    with a marker; an object without one is skipped with a warning)."""
    where = storage.location(directory)
    names = storage.listdir(where)
    found = [storage.join(where, n) for n in names if NAME.match(n)]
    if storage.is_remote(where):
        complete = []
        for f in found:
            marker = storage.name(_marker(f))
            if marker not in names:
                _warn_once(f, f"checkpoint: ignoring {f}: no marker (an unfinished upload)")
            else:
                complete.append(f)
        found = complete
    return sorted(found, key=_step)


def load(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint: a file, or a directory's newest good one (a newer one that
    fails its checks is skipped with a warning)."""
    where = storage.location(path)
    found = storage.kind(where)
    if found == "file":
        return _read(where)
    if found == "none":
        raise CheckpointError(f"checkpoint: no file at {where}; pass an existing checkpoint")
    candidates = checkpoints(where)
    if not candidates:
        raise CheckpointError(
            f"checkpoint: no ckpt-*.pt files in {where}; pass a checkpoint "
            "file or the run's checkpoint directory"
        )
    for i, candidate in enumerate(reversed(candidates)):
        try:
            return _read(candidate)
        except CheckpointError as exc:
            if i == len(candidates) - 1:
                raise CheckpointError(f"{exc} (no good checkpoint left in {where})") from None
            _warn_once(candidate, f"{exc}; loading the one before instead")
    raise AssertionError("unreachable")


def _read(path: Location) -> dict[str, Any]:
    data = storage.read_bytes(path)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise CheckpointError(
            f"checkpoint: {path} is not a reclra checkpoint (bad header); "
            "pass a file written by `reclra train`"
        )
    n = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    start = len(MAGIC) + 4 + n
    try:
        header = json.loads(data[len(MAGIC) + 4 : start])
    except ValueError:
        raise CheckpointError(
            f"checkpoint: {path} has a corrupt header; use an earlier checkpoint"
        ) from None
    payload = data[start:]
    if len(payload) != header.get("bytes"):
        raise CheckpointError(
            f"checkpoint: {path} is truncated ({len(payload)} of "
            f"{header.get('bytes')} bytes); use an earlier checkpoint"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(
            f"checkpoint: {path} fails its checksum (corrupt); use an earlier checkpoint"
        )
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint: {path} has format {header.get('format')}, this version reads {FORMAT}"
        )
    if storage.is_remote(path):
        _check_marker(path, header["sha256"])
    return torch.load(io.BytesIO(payload), weights_only=True)


def _check_marker(path: Location, digest: str) -> None:
    marker = _marker(path)
    if storage.kind(marker) != "file":
        raise CheckpointError(
            f"checkpoint: {path} has no marker {storage.name(marker)} (an upload that never "
            "finished); pass the checkpoint directory to use the newest complete one"
        )
    try:
        note = json.loads(storage.read_bytes(marker))
    except ValueError:
        note = {}
    if note.get("sha256") != digest:
        raise CheckpointError(
            f"checkpoint: {path} does not match its marker {storage.name(marker)} (replaced "
            "mid-upload); use an earlier checkpoint"
        )


def check_compatible(state: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose model, rule or data differ from the resuming run's."""
    saved = state.get("config", {})
    for section in MUST_MATCH:
        if saved.get(section) != config.get(section):
            keys = sorted(
                k
                for k in set(saved.get(section, {})) | set(config.get(section, {}))
                if saved.get(section, {}).get(k) != config.get(section, {}).get(k)
            )
            raise CheckpointError(
                f"checkpoint: {path} was written with a different [{section}] "
                f"({', '.join(f'{section}.{k}' for k in keys)}); resume with "
                "the config that wrote it"
            )


def run_state(
    config: dict[str, Any], runner_state: dict[str, Any], position: dict[str, int], runlog: Any
) -> dict[str, Any]:
    """What a checkpoint holds of a run: its config, the runner's state, where training stands,
    the curves so far and the torch RNG (a resume continues augmentation exactly)."""
    return {
        "config": config,
        "runner": runner_state,
        "position": position,
        "runlog": {"epochs": runlog.epochs, "steps": runlog.steps},
        "torch_rng": torch.get_rng_state(),
    }
