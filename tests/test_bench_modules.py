"""Every benchmark module imports: a name moved between bench modules (as SHARED did, from
bench.accuracy to bench.budgets) breaks `python -m bench.X` long before anyone runs it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for p in (ROOT / "bench").rglob("*.py")
    if "results" not in p.parts
)


def test_the_benchmarks_are_found() -> None:
    assert {"bench.accuracy", "bench.pipeline", "bench.scaling.main", "bench.chaos.soak"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name: str) -> None:
    importlib.import_module(name.removesuffix(".__init__").removesuffix(".__main__"))
