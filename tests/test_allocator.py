"""A training process keeps freed memory for reuse: the next step's tensors do not page-fault
fresh memory in (each case in its own process: the setting is process-wide)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from workers.models import ModelConfig
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage
spec = StageSpec(
    model=ModelConfig(name="resnet8", width=16), rule=RuleConfig(mirror_angle=0.0),
    optim=OptimConfig(), input_shape=(1, 28, 28), num_classes=10, blocks=(0, 5),
    keep_freed_memory=sys.argv[1] == "keep",
)
stage = Stage(spec)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step(mb):
    stage.forward(mb, x)
    stage.learn(mb, ErrorSignal(labels=y))
    stage.apply()
for mb in range(3):  # warm: the first steps fault their memory in in any case
    step(mb)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mb in range(5):
    step(mb)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_activations_are_reused_not_faulted_in_again():
    """A ResNet-8 training step at batch 64 (activations of 3 MiB and more): glibc's default
    hands the freed activations back and faults them in again, 3,700-18,000 pages a step here
    (glibc's dynamic mmap threshold varies it by process); kept, a step reuses the last
    one's (0-500 faults a step)."""
    kept, default = _faults("keep"), _faults("default")
    assert default > 1_000, default  # the premise: by default a step faults memory in
    assert kept * 5 < default, (kept, default)


def test_a_stage_sets_it_on_cpu_unless_told_not_to(monkeypatch):
    from workers import stage as stage_module
    from workers.models import ModelConfig
    from workers.optim import OptimConfig
    from workers.rules import RuleConfig
    from workers.spec import StageSpec

    calls = []
    monkeypatch.setattr(stage_module, "keep_freed_memory", lambda: calls.append(1))
    spec = StageSpec(
        model=ModelConfig(name="mlp", hidden=4, depth=1),
        rule=RuleConfig(),
        optim=OptimConfig(),
        input_shape=(3,),
        num_classes=2,
        blocks=(0, 2),
    )
    stage_module.Stage(spec)
    assert calls == [1]
    from dataclasses import replace

    stage_module.Stage(replace(spec, keep_freed_memory=False))
    assert calls == [1]
