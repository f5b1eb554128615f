"""The memory estimate (driver/run/memory.py): what it counts matches what the stages build, it
grows with width, batch and dtype as it should, it never allocates the model, and one real run's
peak RSS lies within the error band the benchmark measured ("Memory estimate", docs/service.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from driver.config import Config, parse_config, with_rule
from driver.run.memory import (
    BASELINE_BYTES,
    DTYPE_BYTES,
    GIB,
    MemoryEstimate,
    data_shape,
    estimate_memory,
    model_blocks,
)
from workers.chain import stage_specs
from workers.models import ModelConfig
from workers.rules import RULES
from workers.rules.recipes import variants
from workers.spec import StageSpec
from workers.stage import Stage

ROOT = Path(__file__).resolve().parents[1]
SYNTH = '[data]\nname = "synthetic"\nsynthetic_size = 256\n'
# estimate / measured peak RSS, as bench/memory.py measured it (bench/results/memory_cpu.json)
BAND = (0.8, 2.0)


def cfg_of(text: str = "", *overrides: str) -> Config:
    return parse_config(text, list(overrides))


def parts(text: str = "", *overrides: str) -> dict[str, int]:
    """The resident parts and those of a training step (whichever phase peaks)."""
    run = estimate_memory(cfg_of(text, *overrides)).processes[0]
    return {**run.resident, **run.phases["training step"]}


def test_float64_doubles_every_tensor_part() -> None:
    f32 = parts(SYNTH, "train.batch_size=64")
    f64 = parts(SYNTH, "train.batch_size=64", 'train.dtype="float64"')
    for name in ("weights", "error synapses", "optimizer", "gradients", "learn"):
        assert f64[name] == 2 * f32[name], name
    # the activations also keep the input, cast from the loader's float32
    assert 2 * f32["activations"] < f64["activations"] < 2.1 * f32["activations"]
    assert f64["data"] == f32["data"]  # the dataset stays float32 on the loader's side
    assert f64["baseline"] == f32["baseline"]


def test_width_grows_weights_quadratically_and_activations_linearly() -> None:
    narrow = parts(SYNTH, "model.width=16", "train.batch_size=64")
    wide = parts(SYNTH, "model.width=32", "train.batch_size=64")
    assert 3.5 < wide["weights"] / narrow["weights"] <= 4.0
    assert 3.5 < wide["optimizer"] / narrow["optimizer"] <= 4.0
    assert 1.8 < wide["activations"] / narrow["activations"] <= 2.05


def test_batch_grows_activations_not_weights() -> None:
    small = parts(SYNTH, "train.batch_size=32")
    big = parts(SYNTH, "train.batch_size=128")
    assert big["activations"] == 4 * small["activations"]
    assert big["weights"] == small["weights"]
    # micro-batches: a step holds one micro-batch's activations at a time (K = 1)
    split = parts(SYNTH, "train.batch_size=128", "pipeline.micro_batches=4")
    assert split["activations"] == small["activations"]


def test_rec_lra_counts_its_error_synapses_backprop_none() -> None:
    cfg = cfg_of(SYNTH, "train.batch_size=64")
    rec = estimate_memory(cfg)
    bp = estimate_memory(with_rule(cfg, "backprop"))
    assert bp.parts.get("error synapses", 0) == 0
    # KP synapses: one E per layer but the stem's (nothing below the input), W's size each
    assert 0.9 * rec.parts["weights"] < rec.parts["error synapses"] < rec.parts["weights"]
    assert rec.total > bp.total
    # and they learn: AdamW's moments cover them too
    assert rec.parts["optimizer"] > 1.8 * bp.parts["optimizer"]


def test_adamw_keeps_two_moments_sgd_one_or_none() -> None:
    base = (SYNTH, 'rule.name="backprop"')
    adam = parts(*base)
    sgd = parts(*base, 'optim.name="sgd"')
    plain = parts(*base, 'optim.name="sgd"', "optim.momentum=0.0")
    assert adam["optimizer"] == 2 * sgd["optimizer"] > 0
    assert plain.get("optimizer", 0) == 0
    assert sum(adam.values()) > sum(sgd.values()) > sum(plain.values())


def _huge(width: int) -> Config:
    """ResNet-18 of `width` channels, past the config's bound if need be (the estimator must
    not care)."""
    cfg = cfg_of('[model]\nname = "resnet18"\n[data]\nname = "imagenet"\nroot = "/nonexistent"\n')
    try:
        model = dataclasses.replace(cfg.model, width=width)
    except ValueError:
        model = dataclasses.replace(cfg.model)
        object.__setattr__(model, "width", width)
    return dataclasses.replace(cfg, model=model)


def test_a_huge_model_is_estimated_in_milliseconds_without_allocating() -> None:
    estimate_memory(cfg_of())  # the first call pays for imports
    cfg = _huge(10**6)
    t0 = time.perf_counter()
    est = estimate_memory(cfg)
    seconds = time.perf_counter() - t0
    assert seconds < 0.5, f"{seconds:.2f} s"
    # 11M parameters at width 64 scale with width^2: ~2.7e15 at 10**6, 4 bytes each
    assert est.parts["weights"] > 1e16
    assert est.total > 1e16
    assert "GiB" in est.line()
    # nothing of that size ever existed: the process is still small
    import resource

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 64 * GIB


@pytest.mark.parametrize("variant", variants(sorted(RULES)))
def test_every_rule_and_preset_matches_what_its_stages_build(variant: str) -> None:
    """Weights, synapses and optimizer moments of the estimate are exactly those of the stages
    a run builds: K = 1, and K = 2 on Ray (a decoupled stage with its auxiliary head)."""
    text = '[model]\nwidth = 4\n[data]\nname = "synthetic"\nsynthetic_shape = [3, 8, 8]\n'
    for k in (1, 2):
        extra = [f"pipeline.stages={k}", 'pipeline.backend="ray"', "pipeline.boundaries=[2]"]
        cfg = with_rule(cfg_of(text, *(extra if k > 1 else [])), variant)
        est = estimate_memory(cfg)
        procs = est.stages or est.processes
        assert len(procs) == k
        shape, classes = data_shape(cfg.data)
        base = StageSpec(
            model=cfg.model,
            rule=cfg.rule,
            optim=cfg.optim,
            input_shape=shape,
            num_classes=classes,
            blocks=(0, model_blocks(cfg)),
            keep_freed_memory=False,
        )
        bounds = [0, *cfg.pipeline.boundaries, model_blocks(cfg)] if k > 1 else [0, 5]
        db = DTYPE_BYTES[cfg.train.dtype]
        moments = 2 if cfg.optim.name == "adamw" else 1
        for proc, spec in zip(procs, stage_specs(base, bounds), strict=True):
            stage = Stage(spec)
            held = sum(p.numel() for p in stage.blocks.parameters())
            held += sum(b.numel() for b in stage.blocks.buffers())
            learned = sum(p.numel() for g in stage.optimizer.param_groups for p in g["params"])
            got = proc.resident["weights"] + proc.resident["error synapses"]
            assert got == db * held, (variant, k, spec.blocks)
            assert proc.resident["optimizer"] == db * learned * moments, (variant, k)


def test_decoupled_stages_count_their_heads() -> None:
    text = SYNTH + "[pipeline]\nstages = 2\nboundaries = [2]\n"
    decoupled = estimate_memory(cfg_of(text))  # rec-LRA on 2 stages: decoupled by default
    chained = estimate_memory(cfg_of(text + '[rule]\npreset = "mirror"\n'))
    assert len(decoupled.stages) == len(chained.stages) == 2
    lower_d, lower_c = decoupled.stages[0], chained.stages[0]
    assert lower_d.resident["weights"] > lower_c.resident["weights"]  # its auxiliary head
    assert decoupled.stages[1].resident["weights"] == chained.stages[1].resident["weights"]
    # the whole run: the driver, each stage, Ray's own processes; said per stage too
    assert decoupled.total == sum(p.total for p in decoupled.processes) + sum(
        decoupled.shared.values()
    )
    assert "per stage" in decoupled.describe()


def test_describe_names_the_parts_and_sums_to_the_total() -> None:
    est = estimate_memory(cfg_of(SYNTH, 'model.name="resnet18"', "model.width=64"))
    line = est.describe()
    assert line.startswith(f"~{est.total / GIB:.1f} GiB")
    for name in ("baseline", "weights", "error synapses", "optimizer", "checkpoint"):
        assert name in line
    assert "(peak: checkpoint)" in line  # a wide model at a small batch: the final checkpoint
    assert sum(est.parts.values()) == est.total  # on CPU every part is host memory
    assert est.parts["baseline"] >= BASELINE_BYTES


def test_model_blocks_and_data_shapes() -> None:
    assert model_blocks(cfg_of()) == 5  # stem, three stages of one block, head
    assert model_blocks(cfg_of('[model]\nname = "resnet18"\n')) == 10
    assert data_shape(cfg_of().data) == ((1, 8, 8), 10)
    fashion = cfg_of('[data]\nname = "fashion_mnist"\n').data
    assert data_shape(fashion) == ((1, 28, 28), 10)
    assert isinstance(estimate_memory(cfg_of('[data]\nname = "cifar10"\n')), MemoryEstimate)


def test_a_real_run_peaks_within_the_band_of_its_estimate(tmp_path: Path) -> None:
    """A small run trained to its end in a fresh process: its peak RSS and the estimate agree
    within the band bench/memory.py measured."""
    text = SYNTH + "[model]\nwidth = 16\n[train]\nbatch_size = 128\n"
    overrides = [
        "train.max_steps=2",
        "train.epochs=1",
        "train.threads=1",
        f'train.out_dir="{tmp_path}"',
        "train.compare=[]",
    ]
    est = estimate_memory(cfg_of(text, *overrides))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", json.dumps([text, overrides])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
    ratio = est.total / measured
    assert BAND[0] <= ratio <= BAND[1], f"estimate {est.line()} vs measured {measured / GIB:.2f}"
    assert math.isfinite(ratio)


def test_the_model_itself_is_never_built_on_a_real_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block the estimate builds lives on the meta device."""
    import workers.models as models

    made: list[torch.nn.Module] = []
    real = models.model_plan

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        plan = real(*args, **kwargs)
        return [(n, (lambda f=f: made.append(f()) or made[-1])) for n, f in plan]

    monkeypatch.setattr("driver.run.memory.model_plan", spy)
    estimate_memory(cfg_of(SYNTH))
    assert made
    assert all(p.device.type == "meta" for m in made for p in m.parameters())
    assert ModelConfig().name == "resnet8"
