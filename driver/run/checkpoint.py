"""Checkpoints: atomic files with a checksum and the config, units keyed by layer name."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

MAGIC = b"RECLRA-CKPT\n"
FORMAT = 1
NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
# What must agree between a checkpoint and the run resuming it (the stage count may differ).
MUST_MATCH = ("model", "rule", "data")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line saying which file, what is wrong, the fix."""


def save(directory: str | Path, step: int, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write `state` as ckpt-<step>.pt in `directory`: temp file, fsync, rename. Keeps the
    newest `keep` checkpoints (0 keeps all); never touches a file it did not just replace."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = json.dumps(
        {
            "format": FORMAT,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "bytes": len(payload),
            "step": step,
        }
    ).encode()
    path = directory / f"ckpt-{step:08d}.pt"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + len(header).to_bytes(4, "big") + header + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep:
        for old in checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def load(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint (a file, or a directory: its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = checkpoints(path)
        if not found:
            raise CheckpointError(
                f"checkpoint: no ckpt-*.pt files in {path}; pass a checkpoint "
                "file or the run's checkpoint directory"
            )
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no file at {path}; pass an existing checkpoint")
    data = path.read_bytes()
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
    return torch.load(io.BytesIO(payload), weights_only=True)


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
