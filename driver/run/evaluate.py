"""`reclra eval`: the test accuracy of a trained model, read from a run (a checkpoint file, a
checkpoints directory, a run folder) or from an export (torch state dict or safetensors), on
the data its config names."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from driver.config import Config, load_config, parse_config
from driver.data.load import load_dataset, make_loader
from driver.pipeline.build import resolve_device
from driver.run import checkpoint_store, storage
from driver.run.export import (
    EXTRA,
    ExportError,
    build_plain,
    config_toml,
    load_run,
    load_weights,
    plain_model,
    recorded_config,
    sidecar,
)
from driver.run.storage import Location


@dataclass(frozen=True)
class Evaluation:
    """What `reclra eval` reports."""

    correct: int
    samples: int
    data: str  # the dataset evaluated on
    source: str  # what was evaluated: the checkpoint or export file

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)

    def line(self) -> str:
        return (
            f"test acc {self.accuracy:.4f} ({self.correct}/{self.samples} on {self.data}) "
            f"of {self.source}"
        )


def decode_export(data: bytes, where: Location) -> dict[str, torch.Tensor]:
    """The tensors of an exported file: a torch.save'd state dict or safetensors."""
    if data[:4] == b"PK\x03\x04" and zipfile.is_zipfile(io.BytesIO(data)):
        try:
            tensors = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            line = " ".join(str(exc).split())[:200]
            raise ExportError(
                f"eval: {where} is a torch file that does not load ({line})"
            ) from None
        if not isinstance(tensors, dict) or not all(torch.is_tensor(v) for v in tensors.values()):
            raise ExportError(
                f"eval: {where} holds a {type(tensors).__name__}, not a state dict of tensors; "
                "pass a file written by `reclra export`"
            )
        return tensors
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)  # type: ignore[no-any-return]
    except (SafetensorError, ValueError):
        raise ExportError(
            f"eval: {where} is not a reclra checkpoint, a torch state dict or a safetensors "
            "file; pass a checkpoint, a run folder (train.out_dir/<rule>) or an export"
        ) from None


def _export_config(where: Location, config: str | Path | None, overrides: list[str]) -> Config:
    """The config of an exported model: --config, else the one export wrote beside it."""
    if config is not None:
        return load_config(config, overrides)
    beside = sidecar(where)
    if storage.kind(beside) != "file":
        raise ExportError(
            f"eval: no config beside {where} (looked for {storage.name(beside)}); pass --config "
            "with the config the model was trained with"
        )
    return parse_config(storage.read_bytes(beside).decode("utf-8"), overrides, source=str(beside))


def trained_model(
    path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[nn.Module, Config, str]:
    """(the plain model, its config, what it was read from) of a run or an export at `path`.
    The config: `config` (a TOML file) if given, else the one recorded by the run (in its
    checkpoint) or written by the export beside it; `overrides` (--set) on top."""
    sets = list(overrides or [])
    where = storage.location(path)
    found = storage.kind(where)
    if found == "none":
        raise ExportError(
            f"eval: nothing at {where}; pass a checkpoint, a run folder (train.out_dir/<rule>) "
            "or a file written by `reclra export`"
        )
    if found == "file":
        data = storage.read_bytes(where)
        if not data.startswith(checkpoint_store.MAGIC):
            tensors = decode_export(data, where)
            if "fc.weight" not in tensors:
                raise ExportError(f"eval: {where} has no fc.weight; it is not a reclra export")
            cfg = _export_config(where, config, sets)
            net = build_plain(cfg, int(tensors["fc.weight"].shape[0]))
            load_weights(net, {k: v for k, v in tensors.items() if not k.startswith(EXTRA)})
            return net.eval(), cfg, str(where)
    state, at = load_run(where)
    if config is not None:
        cfg = load_config(config, sets)
    else:
        cfg = recorded_config(config_toml(state["config"]), sets)
    return plain_model(cfg, state), cfg, f"{at} (step {state['runlog']['steps']})"


@torch.no_grad()
def count_correct(net: nn.Module, ds: Any, batch_size: int, device: str) -> tuple[int, int]:
    """(correct, samples) of `net`'s predictions over `ds`, batched as a run evaluates."""
    param = next(net.parameters())
    net = net.to(device)
    correct = n = 0
    for x, y in make_loader(ds, max(batch_size, 256), shuffle=False, seed=0):
        logits = net(x.to(device, param.dtype)).float().cpu()
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return correct, n


def evaluate_trained(
    path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> Evaluation:
    """`reclra eval`: the test accuracy of the model at `path` (trained_model) on the test
    split of the data its config names."""
    net, cfg, source = trained_model(path, config, overrides)
    device = resolve_device(cfg.train.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError(
            'eval: train.device = "cuda" but no CUDA device is visible here; add '
            "--set 'train.device=\"cpu\"'"
        )
    splits = load_dataset(cfg.data)
    correct, n = count_correct(net, splits.test, cfg.train.batch_size, device)
    return Evaluation(correct, n, cfg.data.name, source)
