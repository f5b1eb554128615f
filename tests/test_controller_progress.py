"""Progress for people: bars only on a terminal or with --progress; a log line every
train.log_every steps elsewhere (a `ray job submit` or CI log must not fill with bar redraws)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, *extra: str) -> tuple[int, str]:
    """(exit code, stderr as written: bytes decoded without newline translation, so a bar's
    carriage returns stay visible)."""
    out = tmp_path / "runs"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "driver.cli",
            "train",
            *extra,
            "--set",
            "model.width=4",
            "--set",
            "train.epochs=1",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.log_every=2",
            "--set",
            "train.compare=[]",
            "--set",
            f"train.out_dir={json.dumps(str(out))}",
        ],
        capture_output=True,  # stderr is a pipe, not a terminal
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's driver, not an installed one
        timeout=300,
    )
    return p.returncode, p.stderr.decode()


def test_a_piped_run_logs_lines_and_draws_no_bars(tmp_path):
    code, err = _train(tmp_path)
    assert code == 0, err
    assert "\r" not in err and "step/s" not in err and "s/step" not in err
    steps = [int(s) for s in re.findall(r"rec_lra step (\d+) \(epoch 1/1", err)]
    assert steps == [2, 4, 6], err
    assert "rec_lra epoch 1: val acc" in err


def test_progress_flag_draws_bars_in_a_pipe(tmp_path):
    code, err = _train(tmp_path, "--progress")
    assert code == 0, err
    assert "\r" in err and "rec_lra epoch 1/1" in err  # tqdm redraws its bar
    assert not re.search(r"rec_lra step \d+ \(epoch", err)  # the bar replaces the lines
