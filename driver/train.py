"""Single-process training: epochs over a runner, per-epoch validation, test, JSON curves."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from driver.config import Config, config_to_dict
from driver.data import DatasetSplits, load_dataset, make_loader
from workers.models import model_plan
from workers.runner import LocalRunner
from workers.stage import StageSpec

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device: cuda asked for but no CUDA device is visible; "
            'set train.device = "cpu" or "auto"'
        )
    return name


def base_spec(cfg: Config, splits: DatasetSplits) -> StageSpec:
    """A spec for one stage owning the whole model; pipelines cut it into stages."""
    n = len(model_plan(cfg.model, splits.input_shape, splits.num_classes))
    optim = cfg.optim
    if optim.total_steps == 0:  # the schedule spans the whole run
        per_epoch = math.ceil(len(splits.train) / cfg.train.batch_size)  # type: ignore[arg-type]
        total = cfg.train.epochs * per_epoch
        optim = replace(optim, total_steps=min(total, cfg.train.max_steps or total))
    return StageSpec(
        model=cfg.model,
        rule=cfg.rule,
        optim=optim,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        blocks=(0, n),
        seed=cfg.train.seed,
        dtype=cfg.train.dtype,
        device=resolve_device(cfg.train.device),
    )


@dataclass
class RunLog:
    """The curves of one run, written as JSON after every epoch."""

    rule: str
    config: dict[str, Any]
    epochs: list[dict[str, float]] = field(default_factory=list)
    test_acc: float | None = None
    test_loss: float | None = None
    step_seconds: float = 0.0
    steps: int = 0
    wall_seconds: float = 0.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, path)


@torch.no_grad()
def evaluate(runner: LocalRunner, ds: Any, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the runner's eval-mode forward over `ds`."""
    correct, loss, n = 0, 0.0, 0
    for x, y in make_loader(ds, max(batch_size, 256), shuffle=False, seed=0):
        logits = runner.infer(x).float().cpu()
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return correct / max(n, 1), loss / max(n, 1)


def train(
    cfg: Config,
    *,
    quiet: bool = False,
    out_dir: Path | None = None,
    splits: DatasetSplits | None = None,
    track_test: bool = False,
) -> RunLog:
    """Train `cfg.rule` on `cfg.model` and `cfg.data`; return (and write) its curves.

    `track_test` also records test accuracy after every epoch (benchmarks measure convergence
    with it; model selection only ever looks at validation)."""
    t_start = time.perf_counter()
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # augmentation draws from the global generator
    splits = splits or load_dataset(cfg.data)
    runner = LocalRunner([base_spec(cfg, splits)])
    out = Path(out_dir or tc.out_dir) / cfg.rule.name
    run = RunLog(rule=cfg.rule.name, config=config_to_dict(cfg))
    step_time = 0.0
    for epoch in range(tc.epochs):
        loader = make_loader(
            splits.train,
            tc.batch_size,
            shuffle=True,
            seed=tc.seed,
            epoch=epoch,
            num_workers=cfg.data.num_workers,
        )
        correct = seen = 0
        loss_sum = 0.0
        bar = tqdm(
            loader,
            desc=f"{cfg.rule.name} epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=quiet,
            unit="step",
        )
        for x, y in bar:
            t0 = time.perf_counter()
            logits = runner.step(x, y, tc.micro_batches).float().cpu()
            step_time += time.perf_counter() - t0
            run.steps += 1
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            seen += len(y)
            if run.steps % tc.log_every == 0:
                log.info(
                    "%s step %d: train acc %.3f loss %.3f, %.1f ms/step",
                    cfg.rule.name,
                    run.steps,
                    correct / seen,
                    loss_sum / seen,
                    1e3 * step_time / run.steps,
                )
            bar.set_postfix(acc=f"{correct / seen:.3f}", loss=f"{loss_sum / seen:.3f}")
            if tc.max_steps and run.steps >= tc.max_steps:
                break
        val_acc, val_loss = evaluate(runner, splits.val, tc.batch_size)
        run.epochs.append(
            {
                "epoch": epoch + 1,
                "train_acc": correct / max(seen, 1),
                "train_loss": loss_sum / max(seen, 1),
                "val_acc": val_acc,
                "val_loss": val_loss,
                "seconds": time.perf_counter() - t_start,
            }
        )
        if track_test:
            run.epochs[-1]["test_acc"] = evaluate(runner, splits.test, tc.batch_size)[0]
        log.info("%s epoch %d: val acc %.4f loss %.4f", cfg.rule.name, epoch + 1, val_acc, val_loss)
        run.step_seconds = step_time / max(run.steps, 1)
        run.write(out / "metrics.json")
        if tc.max_steps and run.steps >= tc.max_steps:
            break
    run.test_acc, run.test_loss = evaluate(runner, splits.test, tc.batch_size)
    run.wall_seconds = time.perf_counter() - t_start
    run.write(out / "metrics.json")
    log.info("%s: test acc %.4f", cfg.rule.name, run.test_acc)
    return run
