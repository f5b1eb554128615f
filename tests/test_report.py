"""`reclra report`: PNG plots and a markdown summary from a real run's files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from driver.compare import compare_rules
from driver.config import load_config
from driver.report import ReportError, report


def test_report_of_a_compared_run(tmp_path):
    cfg = load_config(
        None,
        [
            "model.width=4",
            "train.epochs=2",
            "train.batch_size=64",
            f'train.out_dir="{tmp_path}"',
            'train.compare=["backprop"]',
        ],
    )
    compare_rules(cfg, quiet=True)
    md = report(tmp_path, tmp_path / "report")
    text = md.read_text()
    for rule in ("rec_lra", "backprop"):
        run = json.loads((tmp_path / rule / "metrics.json").read_text())
        assert f"| {rule} | {run['test_acc']:.4f} |" in text
        assert f"| {rule} | 0 |" in text  # its stage row
    for png in ("curves.png", "stage_times.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_errors(tmp_path):
    with pytest.raises(ReportError, match="no <rule>/metrics.json"):
        report(tmp_path)
    p = subprocess.run(
        [sys.executable, "-m", "driver.cli", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("reclra: error:")
