"""`reclra report RUN_DIR`: PNG plots (curves per rule, per-stage time, alignment) and a markdown
summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

from driver.api.report_alignment import alignment_figure, alignment_markdown
from workers.rules.recipes import computes


class ReportError(ValueError):
    """Nothing to report: says where it looked."""


def load_runs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{rule: metrics.json} for every <rule>/metrics.json under `run_dir`."""
    if not run_dir.is_dir():
        raise ReportError(f"report: no directory at {run_dir}; pass a run's train.out_dir")
    runs = {}
    for path in sorted(run_dir.glob("*/metrics.json")):
        try:
            runs[path.parent.name] = json.loads(path.read_text())
        except ValueError:
            raise ReportError(
                f"report: {path} is not valid JSON; was the run interrupted while writing it?"
            ) from None
    if not runs:
        raise ReportError(
            f"report: no <rule>/metrics.json under {run_dir}; pass the "
            "train.out_dir of a finished run"
        )
    return runs


def curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    acc, loss = fig.subplots(1, 2)
    for rule, run in runs.items():
        epochs = [e["epoch"] for e in run["epochs"]]
        acc.plot(epochs, [e["val_acc"] for e in run["epochs"]], marker="o", label=rule)
        loss.plot(epochs, [e["train_loss"] for e in run["epochs"]], marker="o", label=rule)
    acc.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    loss.set(title="training loss (cross-entropy of the logits)", xlabel="epoch", ylabel="loss")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def stage_times(runs: dict[str, dict[str, Any]], path: Path) -> None:
    labels, fwd, learn, idle = [], [], [], []
    for rule, run in runs.items():
        for stage, st in sorted(run.get("stages", {}).items(), key=lambda kv: int(kv[0])):
            labels.append(f"{rule}\nstage {stage}")
            fwd.append(st["forward_s"])
            learn.append(st["learn_s"])
            idle.append(st["idle_s"])
    fig = Figure(figsize=(max(5, 1.3 * len(labels)), 4))
    ax = fig.subplots()
    x = range(len(labels))
    ax.bar(x, fwd, label="forward")
    ax.bar(x, learn, bottom=fwd, label="learn + apply")
    ax.bar(x, idle, bottom=[a + b for a, b in zip(fwd, learn, strict=True)], label="idle")
    ax.set_xticks(list(x), labels)
    ax.set(title="time per stage over the run", ylabel="seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(runs: dict[str, dict[str, Any]], alignment: list[str] | None = None) -> str:
    """The summary; `alignment`: the series alignment.png holds (none: no such section)."""
    lines = [
        "# reclra run report",
        "",
        "| rule | test acc | best val acc | epochs | steps | samples/s | restarts |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, run in runs.items():
        best = max((e["val_acc"] for e in run["epochs"]), default=float("nan"))
        test = run.get("test_acc")
        lines.append(
            f"| {rule} | {'-' if test is None else f'{test:.4f}'} | {best:.4f} | "
            f"{len(run['epochs'])} | {run['steps']} | "
            f"{run.get('samples_per_second', 0):.1f} | {run.get('restarts', 0)} |"
        )
    lines += ["", "What each rule computes:", ""]
    lines += [f"- `{rule}`: {computes(rule) or 'see its config'}" for rule in runs]
    lines += [
        "",
        "![curves](curves.png)",
        "",
        "![stage times](stage_times.png)",
        "",
        "## Stages",
        "",
        "| rule | stage | forward s | learn s | idle s | bytes in | staleness mean / max |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, run in runs.items():
        for stage, st in sorted(run.get("stages", {}).items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {rule} | {stage} | {st['forward_s']:.2f} | {st['learn_s']:.2f} | "
                f"{st['idle_s']:.2f} | {int(st['bytes_received'])} | "
                f"{st['staleness_mean']:.2f} / {int(st['staleness_max'])} |"
            )
        if run.get("partition"):
            lines.append(f"| {rule} | cut at blocks | {run['partition']} | | | | |")
    lines += exits_markdown(runs)
    lines += alignment_markdown(alignment or [])
    return "\n".join(lines) + "\n"


def exits_markdown(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The early-exit accuracy of each stage, for runs that recorded it (decoupled runs on
    K > 1 stages: exit_test_acc, exit_val_acc); no section when none did."""
    rows = []
    for rule, run in runs.items():
        test = run.get("exit_test_acc") or []
        val = run.get("exit_val_acc") or (run["epochs"][-1] if run["epochs"] else {}).get(
            "exit_val_acc", []
        )
        for stage in range(max(len(test), len(val))):
            cells = [f"{accs[stage]:.4f}" if stage < len(accs) else "-" for accs in (test, val)]
            rows.append(f"| {rule} | {stage} | {cells[0]} | {cells[1]} |")
    if not rows:
        return []
    return [
        "",
        "## Early exits",
        "",
        "The accuracy of each stage's early exit (its auxiliary head); the top stage's is the "
        "model's.",
        "",
        "| rule | stage | test acc | val acc |",
        "|---|---|---|---|",
        *rows,
    ]


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write curves.png, stage_times.png, alignment.png (when a run recorded alignment) and
    report.md; return the markdown's path."""
    run_dir = Path(run_dir)
    runs = load_runs(run_dir)
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    curves(runs, out / "curves.png")
    stage_times(runs, out / "stage_times.png")
    drawn = alignment_figure(runs, out / "alignment.png")
    md = out / "report.md"
    md.write_text(markdown(runs, drawn))
    return md
