"""The real rules match the independent float64 reference (tests/reference_lra.py) on an MLP."""

from __future__ import annotations

import pytest
import reference_lra as ref
import torch

from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import ErrorSignal, RuleConfig
from workers.spec import StageSpec
from workers.stage import Stage

D0, H, K, B = 12, 10, 4, 16


def _stage(depth: int, gap: int, residual: bool, act: str, rule: RuleConfig, lr: float) -> Stage:
    model = ModelConfig(
        name="mlp", hidden=H, depth=depth, gap=gap, residual=residual, act=act, batchnorm=False
    )
    n = len(model_plan(model, (D0,), K))
    return Stage(
        StageSpec(
            model=model,
            rule=rule,
            optim=OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0),
            input_shape=(D0,),
            num_classes=K,
            blocks=(0, n),
            dtype="float64",
        )
    )


def _bind(stage: Stage, params: dict, depth: int, gap: int) -> dict[str, torch.nn.Parameter]:
    """Map reference names onto the stage's parameters and copy the reference values in."""
    units = stage.units()
    binding: dict[str, torch.nn.Parameter] = {}
    for i in range(depth):
        layer = units[f"dense{i // gap}.fc{i % gap}"]
        binding[f"W{i}"], binding[f"b{i}"] = layer.weight, layer.bias
        if layer.feedback is not None:
            binding[f"E{i}"] = layer.feedback
    head = units["head.fc"]
    binding["Whead"], binding["bhead"] = head.weight, head.bias
    if head.feedback is not None:
        binding["Ehead"] = head.feedback
    for k in range(depth // gap):
        syn = units.get(f"dense{k}.skip{gap - 1}")
        if syn is not None:
            binding[f"M{k}"] = syn.weight
    with torch.no_grad():
        for key, p in binding.items():
            p.copy_(params[key].T if key.startswith("M") else params[key])
    return binding


CASES = [
    # rule, topology, feedback_update, skip_update, depth, gap, residual, act, mix
    ("rec_lra", "skip", "kp", "kp", 4, 2, True, "relu", (0.19, 0.24)),
    ("rec_lra", "skip", "local", "local", 4, 2, True, "tanh", (0.19, 0.24)),
    ("rec_lra", "skip", "fixed", "fixed", 3, 1, False, "relu", (0.5, 0.5)),
    ("rec_lra", "mirror", "kp", "kp", 4, 2, True, "tanh", (0.19, 0.24)),
    ("rec_lra", "adjacent", "kp", "kp", 4, 2, True, "relu", (0.19, 0.24)),
    ("lra_e", "adjacent", "kp", "kp", 3, 1, False, "tanh", (1.0, 1.0)),
    ("lra_e", "adjacent", "local", "kp", 2, 1, False, "relu", (1.0, 1.0)),
]


@pytest.mark.parametrize("rescale", [False, True], ids=["raw", "rescaled"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_three_steps_match_reference(case, rescale):
    name, topology, fb, sk, depth, gap, residual, act, (mix_s, mix_a) = case
    lr, beta, gamma, radius = 0.05, 0.2, 0.7, 0.8
    shared = dict(
        topology=topology,
        feedback_update=fb,
        skip_update=sk,
        beta=beta,
        gamma=gamma,
        mix_skip=mix_s,
        mix_adjacent=mix_a,
        reproject=radius,
        rescale_error=rescale,
    )
    # the synapses' values are copied in from the reference: the init schemes do not matter
    rule = RuleConfig(name=name, input_noise=0.0, mirror_angle=0.0, **shared)
    stage = _stage(depth, gap, residual, act, rule, lr)
    params = ref.init_params(D0, H, depth, K, gap, seed=3)
    binding = _bind(stage, params, depth, gap)
    gen = torch.Generator().manual_seed(0)
    kw = dict(depth=depth, gap=gap, act=act, residual=residual, rule=name, **shared)
    for _ in range(3):
        x = torch.randn(B, D0, generator=gen, dtype=torch.float64)
        y = torch.randint(0, K, (B,), generator=gen)
        params = ref.step(params, x, y, lr=lr, **kw)
        # two micro-batches, one apply: must equal the reference's one full-batch step
        for mb, sl in enumerate((slice(0, 5), slice(5, B))):
            stage.forward(mb, x[sl])
            stage.learn(mb, ErrorSignal(labels=y[sl]))
        stage.apply()
    assert binding, "nothing bound"
    for key, p in binding.items():
        expect = params[key].T if key.startswith("M") else params[key]
        torch.testing.assert_close(p.detach(), expect, rtol=1e-10, atol=1e-12, msg=key)
    # synapses the reference says are unused must not exist in the stage either
    err_kw = {
        k: v
        for k, v in kw.items()
        if k not in ("gamma", "feedback_update", "skip_update", "reproject", "rescale_error")
    }
    used = set(ref.compute_errors(params, x, y, **err_kw)["used"])
    for key in binding:
        if key[0] in "EM":
            assert key in used, f"{key} exists in the stage but the reference never uses it"
