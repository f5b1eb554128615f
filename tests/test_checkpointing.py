"""Checkpoints written in the background: a failed write does not stop the run, a failed final
one fails it, a process killed mid-write leaves the last good checkpoint, and after_checkpoint
fires once a checkpoint is on disk."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from driver.config import load_config
from driver.run import checkpoint_store
from driver.run.callbacks import Callback
from driver.run.controller import Controller, RunFailed, RunState

BASE = [
    "model.width=4",
    "train.epochs=1",
    "train.batch_size=64",
    "train.compare=[]",
    "train.keep_checkpoints=0",
]


class Published(Callback):
    """Records each announced checkpoint, and checks it is on disk and verifies when told."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def after_checkpoint(self, ctl, path) -> None:  # noqa: ANN001
        self.steps.append(int(checkpoint_store.load(path)["runlog"]["steps"]))


def _steps(directory: Path) -> list[int]:
    return [int(Path(str(p)).name[5:13]) for p in checkpoint_store.checkpoints(directory)]


def test_a_failed_write_is_logged_and_counted_and_the_next_one_succeeds(digits, tmp_path, caplog):
    """The checkpoint directory is replaced by a plain file while the step-6 checkpoint is
    written (a real OSError in the writer thread), then put back: the run goes on, logs one
    line naming where and why, counts it, and the later checkpoints are written."""
    cfg = load_config(None, [*BASE, "train.checkpoint_every=3"])
    seen = Published()
    ctl = Controller(cfg, out_dir=tmp_path, splits=digits, callbacks=[seen])
    ckpts, aside = tmp_path / "rec_lra" / "checkpoints", tmp_path / "aside"
    caplog.set_level(logging.WARNING, logger="driver.run.checkpointing")
    while not ctl.done:
        ctl.step()
        if ctl.state is not RunState.RUNNING or ctl.run.steps not in (4, 7):
            continue
        ctl.checkpoints.publish(ctl, ctl.callbacks, wait=True)  # steps 3 / 6 are done
        if ctl.run.steps == 4 and not aside.exists():
            ckpts.rename(aside)
            ckpts.write_text("not a directory")
        elif ctl.run.steps == 7 and ckpts.is_file():
            ckpts.unlink()
            aside.rename(ckpts)
    assert ctl.state is RunState.SUCCEEDED, ctl.error
    assert ctl.checkpoints.failed == 1
    assert _steps(ckpts) == [0, 3, 9, 12, 15, 18, 19]  # 6 is missing, nothing else
    assert seen.steps == [0, 3, 9, 12, 15, 18, 19] and ctl.checkpoints_written == 7
    (line,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert "step 6" in line and str(ckpts) in line and "Error" in line and "\n" not in line


def test_a_final_checkpoint_that_cannot_be_written_fails_the_run(digits, tmp_path):
    cfg = load_config(None, [*BASE, "train.max_restarts=0", "train.max_steps=3"])
    ckpts = tmp_path / "rec_lra" / "checkpoints"
    ckpts.parent.mkdir(parents=True)
    ckpts.write_text("not a directory")
    with pytest.raises(RunFailed, match=r"final one, step 3 to .*checkpoints, failed") as info:
        Controller(cfg, out_dir=tmp_path, splits=digits, callbacks=[]).run_to_end()
    assert "\n" not in str(info.value)


WRITER = """
import sys, torch
from driver.run.checkpointing import CheckpointWriter, Job, Taken
w = CheckpointWriter(keep=0)
def job(step, mb):
    state = {{"units": {{"x": {{"tensors": {{"w": torch.full((mb * 2**18,), float(step))}}}}}}}}
    return Job({directory!r}, step, Taken(state), {{"runlog": {{"steps": step}}}})
w.submit(job(1, 1))
w.finished(wait=True)
print("published", flush=True)
w.submit(job(2, 512))  # 512 MB: the parent kills this process while it is written
w.finished(wait=True)
print("written", flush=True)
"""


def test_a_process_killed_mid_write_leaves_the_last_good_checkpoint(tmp_path):
    """SIGKILL the process while its writer thread writes checkpoint 2: what is left is
    checkpoint 1, complete and verified; the partial file is never listed nor loaded."""
    directory = tmp_path / "ckpts"
    script = textwrap.dedent(WRITER.format(directory=str(directory)))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "published"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the second write has begun: a new entry appears
            if any(p.name != "ckpt-00000001.pt" for p in directory.iterdir()):
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in directory.iterdir() if p.name != "ckpt-00000001.pt"]
    assert partial, "the kill came after the write finished; nothing was tested"
    assert _steps(directory) == [1]
    state = checkpoint_store.load(directory)  # the directory's newest complete checkpoint
    assert (
        state["runlog"]["steps"] == 1
        and float(state["runner"]["units"]["x"]["tensors"]["w"][0]) == 1.0
    )
    shutil.rmtree(directory)
