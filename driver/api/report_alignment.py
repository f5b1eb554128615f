"""The report's alignment figure: synapse angle and backprop cosine per layer over the steps of
each run that recorded them (metrics.json `alignment`; the cosine needs train.diagnose_every)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

LINESTYLES = ("-", "--", ":", "-.")

# keys of a metrics.json alignment entry, and what the figure calls them
SERIES = (
    ("synapse_angle_deg", "synapse angle: error synapse E vs forward weight W", "degrees"),
    ("backprop_cosine", "cosine of the local update with backprop's gradient", "cosine"),
)


def _per_layer(entries: list[dict[str, Any]], key: str) -> dict[str, tuple[list, list]]:
    """{layer: (steps, values)} of one series, in step order."""
    out: dict[str, tuple[list, list]] = {}
    for e in entries:
        for layer, v in e.get(key, {}).items():
            steps, values = out.setdefault(layer, ([], []))
            steps.append(e["step"])
            values.append(v)
    return out


def alignment_figure(runs: dict[str, dict[str, Any]], path: Path) -> list[str]:
    """Write the figure: one panel per series that some run holds (each line a rule's layer).
    Returns the series drawn ([] and no file when no run recorded any alignment)."""
    drawn = [
        (key, title, unit)
        for key, title, unit in SERIES
        if any(e.get(key) for run in runs.values() for e in run.get("alignment", []))
    ]
    if not drawn:
        return []
    fig = Figure(figsize=(6.5 * len(drawn), 4.5))
    axes = fig.subplots(1, len(drawn), squeeze=False)
    for ax, (key, title, unit) in zip(axes[0], drawn, strict=True):
        for i, (rule, run) in enumerate(runs.items()):
            style = LINESTYLES[i % len(LINESTYLES)]  # one per rule; colours follow the layers
            for n, (layer, (steps, values)) in enumerate(
                _per_layer(run.get("alignment", []), key).items()
            ):
                label = layer if len(runs) == 1 else f"{rule} {layer}"
                ax.plot(steps, values, f"C{n % 10}", ls=style, marker=".", label=label)
        if key == "backprop_cosine":
            ax.set_ylim(-1.05, 1.05)
        ax.set(title=title, xlabel="step", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [key for key, _, _ in drawn]


def alignment_markdown(drawn: list[str]) -> list[str]:
    """The report.md lines for the figure (none when nothing was drawn)."""
    if not drawn:
        return []
    what = "the angle between each layer's error synapse and its forward weight"
    if "backprop_cosine" in drawn:
        what += ", and the cosine of each layer's update with backprop's gradient"
    return ["", "## Alignment", "", f"Over the steps: {what}.", "", "![alignment](alignment.png)"]
