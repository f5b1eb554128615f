"""The plan a run resolves (cut, stage count, window) is state of its own: the config stays the
user's input, unchanged by building or resizing."""

from __future__ import annotations

import pytest

from driver.config import config_to_dict, load_config
from driver.pipeline.build import build_runner


@pytest.mark.parametrize(
    "sets, k, window, bounds",
    [
        (["pipeline.stages=3", 'pipeline.backend="local"'], 3, 3, None),
        (["pipeline.stages=3", 'pipeline.backend="local"', "pipeline.max_in_flight=5"], 3, 5, None),
        (
            ["pipeline.stages=2", 'pipeline.backend="local"', "pipeline.boundaries=[1]"],
            2,
            2,
            (0, 1, 5),
        ),
        (["pipeline.stages=1"], 1, 1, (0, 5)),
    ],
)
def test_build_resolves_a_plan_and_leaves_the_config_alone(digits, sets, k, window, bounds):
    cfg = load_config(None, ["model.width=4", *sets])
    before = config_to_dict(cfg)
    runner, plan = build_runner(cfg, digits)
    try:
        assert (plan.k, plan.window) == (k, window)
        assert len(plan.bounds) == k + 1 and plan.bounds[0] == 0 and plan.bounds[-1] == 5
        if bounds is not None:
            assert plan.bounds == bounds
        assert config_to_dict(cfg) == before  # stages and boundaries as the user gave them
    finally:
        runner.close()


def test_a_rebuild_on_other_bounds_changes_the_plan_not_the_config(digits):
    """What elastic resizing does: the same config built on another cut."""
    cfg = load_config(None, ["model.width=4", "pipeline.stages=3", 'pipeline.backend="local"'])
    before = config_to_dict(cfg)
    runner, plan = build_runner(cfg, digits, (0, 2, 5))
    try:
        assert plan.k == 2 and plan.window == 2 and cfg.pipeline.stages == 3
        assert config_to_dict(cfg) == before
    finally:
        runner.close()
