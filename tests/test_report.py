"""`reclra report`: PNG plots and a markdown summary from a real run's files."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from driver.api.report import ReportError, report
from driver.config import load_config
from driver.run.compare import compare_rules, format_table


def test_report_of_a_compared_run(tmp_path):
    cfg = load_config(
        None,
        [
            "model.width=4",
            "train.epochs=2",
            "train.batch_size=64",
            f'train.out_dir="{tmp_path}"',
            'train.compare=["backprop"]',
            "train.diagnose_every=10",
        ],
    )
    runs = compare_rules(cfg, quiet=True)
    md = report(tmp_path, tmp_path / "report")
    text = md.read_text()
    # what each rule computes is said where users read it: the report and the closing table
    assert "- `rec_lra`: rec-LRA targets" in text and "Kolen-Pollack backprop" in text
    assert "- `backprop`: backpropagation" in text
    table = format_table(runs)
    assert "rec_lra: rec-LRA targets" in table
    # the weight mirror's one-off time, beside the step time that includes it
    by_rule = {r.rule: r for r in runs}
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:3]}
    assert table.splitlines()[0].split()[-2:] == ["mirror", "s"]
    assert by_rule["rec_lra"].mirror_seconds > 0 and by_rule["backprop"].mirror_seconds == 0
    assert rows["rec_lra"][-1] == f"{by_rule['rec_lra'].mirror_seconds:.2f}"
    assert rows["backprop"][-1] == "0.00"
    for rule in ("rec_lra", "backprop"):
        run = json.loads((tmp_path / rule / "metrics.json").read_text())
        assert f"| {rule} | {run['test_acc']:.4f} |" in text
        assert f"| {rule} | 0 |" in text  # its stage row
    for png in ("curves.png", "stage_times.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # alignment: rec-LRA's synapse angles, and both rules' cosines with backprop, by step
    assert "![alignment](alignment.png)" in text and "cosine" in text.split("## Alignment")[1]
    both = _png_width(tmp_path / "report" / "alignment.png")

    # without cosines (diagnostics off): the angle panel alone; with no alignment at all (a
    # metrics.json from before alignment existed): no figure and no section
    for name, drop in (("angles", ("backprop_cosine",)), ("none", ())):
        run_dir = tmp_path / name
        shutil.copytree(tmp_path / "rec_lra", run_dir / "rec_lra")
        path = run_dir / "rec_lra" / "metrics.json"
        run = json.loads(path.read_text())
        if drop:
            run["alignment"] = [
                {k: v for k, v in e.items() if k not in drop} for e in run["alignment"]
            ]
        else:
            del run["alignment"]
        path.write_text(json.dumps(run))
        text = report(run_dir).read_text()
        if drop:
            assert "![alignment](alignment.png)" in text
            assert "cosine" not in text.split("## Alignment")[1]
            assert _png_width(run_dir / "alignment.png") < 0.6 * both  # one panel of two
        else:
            assert "alignment" not in text and not (run_dir / "alignment.png").exists()


def _png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    return struct.unpack(">I", data[16:20])[0]  # IHDR width


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


def test_report_leaves_matplotlib_global_state_alone(tmp_path):
    """The figures are matplotlib Figure objects: importing and running the report switches no
    backend and loads no pyplot (a notebook's or an application's own backend stays theirs)."""
    run = {
        "epochs": [{"epoch": 1, "val_acc": 0.5, "train_loss": 1.2}],
        "steps": 3,
        "test_acc": 0.5,
        "stages": {"0": {"forward_s": 1.0, "learn_s": 2.0, "idle_s": 0.5, "bytes_received": 10}},
        "alignment": [{"step": 1, "synapse_angle_deg": {"fc": 40.0}}],
    }
    run["stages"]["0"].update(staleness_mean=0.0, staleness_max=0)
    (tmp_path / "rec_lra").mkdir()
    (tmp_path / "rec_lra" / "metrics.json").write_text(json.dumps(run))
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "from driver.api.report import report\n"
        f"md = report({str(tmp_path)!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "print(before)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "svg"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "svg"
    for png in ("curves.png", "stage_times.png", "alignment.png"):
        assert _png_width(tmp_path / png) > 100
