"""Cutting a model into stages (driver/pipeline/partition.py).

(a) `best_partition` is optimal (checked against brute force over every contiguous cut) and
    returns well-formed bounds; impossible stage counts are refused naming pipeline.stages.
(b) `plan_partition`: explicit boundaries are kept (invalid ones refused), a balanced cut is
    the optimum of the profiled costs, and `profile_blocks` measures one positive cost per block.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import driver.pipeline.partition as partition
from driver.pipeline.partition import Partition, best_partition, plan_partition, profile_blocks
from workers.models import ModelConfig, model_plan
from workers.optim import OptimConfig
from workers.rules import RuleConfig
from workers.spec import StageSpec

SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 8
MODEL = ModelConfig(name="resnet8", width=4)
N_BLOCKS = 5  # stem, layer1.0, layer2.0, layer3.0, head
NAMES = tuple(name for name, _ in model_plan(MODEL, SHAPE, CLASSES))


def _max_part(costs: list[float], bounds: tuple[int, ...]) -> float:
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))


def _brute_force(costs: list[float], k: int) -> float:
    n = len(costs)
    return min(
        _max_part(costs, (0, *cuts, n)) for cuts in itertools.combinations(range(1, n), k - 1)
    )


def _check_bounds(bounds: tuple[int, ...], n: int, k: int) -> None:
    assert isinstance(bounds, tuple)
    assert len(bounds) == k + 1
    assert bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False)), bounds


# -- (a) best_partition -------------------------------------------------------------------------


def test_best_partition_equals_brute_force():
    rng = random.Random(0)
    cases = 0
    for n in range(1, 10):
        for _ in range(12):
            scale = rng.choice([1e-4, 1.0, 1e3])
            costs = [scale * rng.uniform(0.01, 1.0) for _ in range(n)]
            if rng.random() < 0.3:  # one dominant block
                costs[rng.randrange(n)] *= 20
            for k in range(1, n + 1):
                bounds = best_partition(costs, k)
                _check_bounds(bounds, n, k)
                got, want = _max_part(costs, bounds), _brute_force(costs, k)
                assert math.isclose(got, want, rel_tol=1e-12), (costs, k, bounds, got, want)
                cases += 1
    assert cases > 400


def test_best_partition_integer_costs_and_ties():
    """Integer costs (exact sums, many ties) still give an optimal cut."""
    rng = random.Random(1)
    for n in range(1, 10):
        for _ in range(10):
            costs = [float(rng.randint(1, 4)) for _ in range(n)]
            for k in range(1, n + 1):
                bounds = best_partition(costs, k)
                _check_bounds(bounds, n, k)
                assert _max_part(costs, bounds) == _brute_force(costs, k), (costs, k, bounds)


def test_best_partition_known_cuts():
    assert best_partition([1.0] * 6, 3) == (0, 2, 4, 6)
    assert best_partition([1.0] * 6, 6) == (0, 1, 2, 3, 4, 5, 6)
    assert best_partition([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == (0, 1, 6)
    assert best_partition([1.0, 1.0, 1.0, 1.0, 1.0, 5.0], 2) == (0, 5, 6)
    assert best_partition([3.0, 2.0, 7.0], 1) == (0, 3)


@pytest.mark.parametrize("n,k", [(3, 4), (1, 2), (0, 1), (4, 0), (4, -1), (9, 10)])
def test_best_partition_refuses_impossible_stage_counts(n, k):
    with pytest.raises(ValueError, match=r"pipeline\.stages"):
        best_partition([1.0] * n, k)


def test_partition_balance_and_describe():
    part = Partition(bounds=(0, 2, 5), stage_costs=(0.003, 0.001), block_names=("a",) * 5)
    assert part.balance == pytest.approx(1.5)
    assert Partition((0, 5), (0.0,), ("a",) * 5).balance == 1.0
    assert Partition((0, 1, 2), (0.002, 0.002), ("a", "b")).balance == pytest.approx(1.0)
    text = Partition((0, 1, 3), (0.001, 0.002), ("x", "y", "z")).describe()
    assert "stage 0: blocks 0-0 (x) 1.00 ms" in text
    assert "stage 1: blocks 1-2 (y..z) 2.00 ms" in text


# -- (b) plan_partition and profile_blocks ------------------------------------------------------


def _base(rule: str = "rec_lra") -> StageSpec:
    n = len(model_plan(MODEL, SHAPE, CLASSES))
    assert n == N_BLOCKS
    return StageSpec(
        model=MODEL,
        rule=RuleConfig(name=rule),
        optim=OptimConfig(),
        input_shape=SHAPE,
        num_classes=CLASSES,
        blocks=(0, n),
    )


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, *SHAPE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


@pytest.mark.parametrize("cuts", [(1,), (4,), (2, 3), (1, 2, 3, 4)])
def test_plan_partition_keeps_explicit_boundaries(cuts):
    part = plan_partition(_base(), len(cuts) + 1, cuts, None, 1, names=NAMES)
    assert part.bounds == (0, *cuts, N_BLOCKS)
    assert part.stage_costs == (0.0,) * (len(cuts) + 1)
    assert part.block_names == ("stem", "layer1.0", "layer2.0", "layer3.0", "head")


def test_plan_partition_explicit_boundaries_with_a_sample_are_profiled_not_moved():
    part = plan_partition(_base(), 2, (4,), _sample(), 1, names=NAMES)
    assert part.bounds == (0, 4, N_BLOCKS)
    assert len(part.stage_costs) == 2 and all(c > 0 for c in part.stage_costs)


@pytest.mark.parametrize("cuts", [(0,), (5,), (6,), (3, 2), (2, 2), (-1,)])
def test_plan_partition_refuses_invalid_boundaries(cuts):
    with pytest.raises(ValueError, match=r"pipeline\.boundaries"):
        plan_partition(_base(), len(cuts) + 1, cuts, None, 1, names=NAMES)


def test_plan_partition_single_stage_needs_no_profile():
    part = plan_partition(_base(), 1, (), None, 1, names=NAMES)
    assert part.bounds == (0, N_BLOCKS)
    assert part.balance == 1.0


def test_plan_partition_balancing_needs_a_sample():
    with pytest.raises(ValueError, match="pipeline"):
        plan_partition(_base(), 2, (), None, 1, names=NAMES)


def test_plan_partition_balances_the_profiled_costs(monkeypatch):
    """The cut is best_partition of what profile_blocks measured, and the stage costs are its
    per-stage sums."""
    costs = [0.5, 0.1, 0.1, 0.3, 0.4]
    seen = []

    def fake_profile(base, x, y, steps):  # noqa: ANN001, ANN202
        seen.append((x.shape, y.shape, steps))
        return list(costs)

    monkeypatch.setattr(partition, "profile_blocks", fake_profile)
    for k, want in ((2, (0, 3, 5)), (3, (0, 1, 4, 5)), (5, (0, 1, 2, 3, 4, 5))):
        part = plan_partition(_base(), k, (), _sample(), 7, names=NAMES)
        assert part.bounds == want == best_partition(costs, k)
        assert part.stage_costs == pytest.approx(
            [sum(costs[a:b]) for a, b in zip(want, want[1:], strict=False)]
        )
    assert seen[0] == (torch.Size([BATCH, *SHAPE]), torch.Size([BATCH]), 7)
    with pytest.raises(ValueError, match=r"pipeline\.stages"):
        plan_partition(_base(), 6, (), _sample(), 1, names=NAMES)


@pytest.mark.parametrize("rule", ["rec_lra", "backprop"])
def test_plan_partition_two_stages_from_a_real_profile(rule):
    part = plan_partition(_base(rule), 2, (), _sample(), 2, names=NAMES)
    _check_bounds(part.bounds, N_BLOCKS, 2)
    assert len(part.stage_costs) == 2
    assert all(c > 0 for c in part.stage_costs)
    assert part.balance >= 1.0
    assert "stage 1:" in part.describe()


@pytest.mark.parametrize("rule", ["rec_lra", "dfa", "backprop"])
def test_profile_blocks_one_positive_cost_per_block(rule):
    x, y = _sample()
    costs = profile_blocks(_base(rule), x, y, 2)
    assert len(costs) == N_BLOCKS
    assert all(isinstance(c, float) and math.isfinite(c) and c > 0 for c in costs), costs


def test_profile_blocks_mlp():
    model = ModelConfig(name="mlp", hidden=16, depth=3)
    base = StageSpec(
        model=model,
        rule=RuleConfig(),
        optim=OptimConfig(),
        input_shape=(20,),
        num_classes=4,
        blocks=(0, 4),
    )
    g = torch.Generator().manual_seed(0)
    costs = profile_blocks(base, torch.randn(6, 20, generator=g), torch.arange(6) % 4, 1)
    assert len(costs) == 4 and all(c > 0 for c in costs)
