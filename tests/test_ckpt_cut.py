"""Checkpoint cuts taken as the async stream flows: the same state a full drain gives, no
change to training, and a resume that learns every micro-batch exactly once."""

from __future__ import annotations

import pytest
from ckpt_helpers import CUT
from ckpt_helpers import assert_equal as _assert_equal
from ckpt_helpers import batches as _batches
from ckpt_helpers import stage_states as _stage_states

from driver.config import load_config
from driver.pipeline.build import build_runner
from driver.pipeline.stream import StreamPipeline
from driver.run import checkpoint_store
from driver.run.train import train

BASE = CUT
SHAPES = [  # (stages, boundaries, topology): chained, 3 stages, broadcast error
    (2, "[2]", "mirror"),
    (3, "[1, 3]", "mirror"),
    (2, "[2]", "skip"),
]


def _cfg(stages: int, bounds: str, topology: str, *extra: str):
    return load_config(
        None,
        [
            *BASE,
            f"pipeline.stages={stages}",
            f"pipeline.boundaries={bounds}",
            f'rule.topology="{topology}"',
            *extra,
        ],
    )


@pytest.mark.parametrize("stages, bounds, topology", SHAPES)
def test_a_cut_in_flow_is_the_state_a_drain_gives_and_changes_nothing(
    digits, stages, bounds, topology
):
    """Two identical async pipelines fed the same steps: one takes a cut at step 3 and flows
    on, the other drains at step 3. The cut equals the drained state bitwise (weights, error
    synapses, BN statistics, optimizer moments, step, lr progress, noise RNG); it completes
    only once the next step was fed (no drain); and the cut pipeline then trains exactly like a
    third one that never checkpointed."""
    cfg = _cfg(stages, bounds, topology)
    batches = _batches(cfg, digits, 5)
    m = cfg.pipeline.micro_batches
    flowing, drained, plain = (build_runner(cfg, digits)[0] for _ in range(3))
    assert all(isinstance(p, StreamPipeline) for p in (flowing, drained, plain))
    for x, y in batches[:3]:
        for p in (flowing, drained, plain):
            p.step(x, y, m)
    cut = flowing.cut()  # type: ignore[union-attr]
    assert not cut.complete and flowing.cut_pending  # type: ignore[union-attr]
    drained.flush()
    for x, y in batches[3:]:
        for p in (flowing, plain):
            p.step(x, y, m)
    assert cut.complete and not flowing.cut_pending  # type: ignore[union-attr]
    got, want = cut.collect(), _stage_states(drained)  # type: ignore[arg-type]
    _assert_equal(got, want)
    # every stage learned exactly the 3 steps' micro-batches (optimizer steps, lr progress)
    assert len({st["step"] for st in got}) == 1 and [st["progress"] for st in got] == [3.0] * stages
    flowing.flush()
    plain.flush()
    _assert_equal(_stage_states(flowing), _stage_states(plain))  # type: ignore[arg-type]
    for p in (flowing, drained, plain):
        p.close()


def test_an_async_run_checkpoints_without_changing_its_weights_and_resumes_exactly_once(
    digits, tmp_path
):
    """Controller end to end under async: checkpoints every 3 steps leave the final weights
    bitwise those of a run that only checkpoints at its end; a checkpoint's stages all stand at
    its data position; a run resumed from one learns the rest of the micro-batches once each
    (the same optimizer step and lr progress at the end)."""
    every = _cfg(2, "[2]", "mirror", "train.checkpoint_every=3")
    plain = _cfg(2, "[2]", "mirror")
    a = train(every, quiet=True, out_dir=tmp_path / "every", splits=digits)
    b = train(plain, quiet=True, out_dir=tmp_path / "plain", splits=digits)
    ckpts = tmp_path / "every" / "rec_lra" / "checkpoints"
    last = checkpoint_store.load(ckpts)
    _assert_equal(
        last["runner"]["units"],
        checkpoint_store.load(tmp_path / "plain" / "rec_lra" / "checkpoints")["runner"]["units"],
    )
    assert a.steps == b.steps == 19
    mid = checkpoint_store.load(ckpts / "ckpt-00000009.pt")
    assert mid["position"] == {"epoch": 0, "batch": 9}
    assert mid["runner"]["progress"] == 9.0
    resumed = train(
        plain, quiet=True, out_dir=tmp_path / "resumed", splits=digits, resume=ckpts / mid_name(9)
    )
    end = checkpoint_store.load(tmp_path / "resumed" / "rec_lra" / "checkpoints")["runner"]
    assert resumed.steps == 19
    assert end["step"] == last["runner"]["step"] and end["progress"] == last["runner"]["progress"]


def mid_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"
