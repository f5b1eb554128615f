"""GPU checks (skipped without CUDA): stages on the GPU match the CPU; a Ray pipeline shares it."""

from __future__ import annotations

import pytest
import torch

from workers.chain import LocalRunner, stage_specs
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = ModelConfig(name="resnet18", width=8)
SHAPE = (3, 16, 16)


def _base(rule: str, device: str) -> StageSpec:
    n = len(model_plan(MODEL, SHAPE, 10))
    return StageSpec(
        model=MODEL,
        rule=RuleConfig(name=rule, input_noise=0.0),
        optim=OptimConfig(),
        input_shape=SHAPE,
        num_classes=10,
        blocks=(0, n),
        dtype="float64",
        device=device,
    )


def _batches():
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, *SHAPE, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(3)
    ]


def _assert_same_weights(got: dict, expect: dict) -> None:
    for name in expect:
        for key, t in expect[name]["tensors"].items():
            torch.testing.assert_close(
                got[name]["tensors"][key], t, rtol=1e-7, atol=1e-9, msg=f"{name}.{key}"
            )


@pytest.mark.parametrize("rule", ["rec_lra", "backprop", "dfa"])
def test_gpu_stage_matches_cpu(rule):
    cpu, gpu = LocalRunner([_base(rule, "cpu")]), LocalRunner([_base(rule, "cuda")])
    for x, y in _batches():
        cpu.step(x, y, 2)
        gpu.step(x, y, 2)
    _assert_same_weights(gpu.state_dict()["units"], cpu.state_dict()["units"])


@pytest.mark.parametrize("engine", ["stream", "p2p"])
def test_ray_pipeline_on_a_shared_gpu_matches_one_gpu_process(engine):
    """Two stages share the GPU: the stream engine by Ray, the p2p engine by gloo through host
    memory (NCCL takes one rank per device); either trains one GPU process's weights."""
    import ray

    from driver.config.pipeline import PipelineConfig
    from driver.pipeline.p2p import P2PPipeline
    from driver.pipeline.stream import RayPipeline

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        base = _base("rec_lra", "cuda")
        local = LocalRunner([base])
        cfg = PipelineConfig(stages=2, micro_batches=2, gpus_per_stage=0.5, engine=engine)
        pipe = (P2PPipeline if engine == "p2p" else RayPipeline)(stage_specs(base, [0, 4, 10]), cfg)
        try:
            for x, y in _batches():
                pipe.step(x, y, 2)
                local.step(x, y, 2)
            _assert_same_weights(pipe.state_dict()["units"], local.state_dict()["units"])
        finally:
            pipe.close()
    finally:
        ray.shutdown()
