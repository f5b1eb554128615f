"""Generate the gRPC code for driver/api/reclra.proto (run at build and install time).

Writes, next to the .proto: reclra_pb2.py (the messages), reclra_pb2_grpc.py (the service's
Stub and add_TrainingServicer_to_server), and their type stubs reclra_pb2.pyi (protoc's own)
and reclra_pb2_grpc.pyi (mypy-protobuf's protoc-gen-mypy_grpc). The include root is the
repository root, so the generated service module imports the messages as
`from driver.api import reclra_pb2`, a package import, not a top-level `import reclra_pb2`.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the directory holding the driver package
PROTO = "driver/api/reclra.proto"
OUTPUTS = ("reclra_pb2.py", "reclra_pb2.pyi", "reclra_pb2_grpc.py", "reclra_pb2_grpc.pyi")


def _mypy_grpc_plugin(folder: Path) -> Path:
    """An executable protoc plugin running mypy-protobuf's grpc stub writer under this Python
    (the console script may not be on PATH: a build environment, a venv not activated)."""
    try:
        import mypy_protobuf.main  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "protogen: mypy-protobuf is not installed (it writes reclra_pb2_grpc.pyi); "
            "pip install 'mypy-protobuf>=3.6'"
        ) from exc
    plugin = folder / "protoc-gen-mypy_grpc"
    plugin.write_text(
        f"#!{sys.executable}\nimport sys\nfrom mypy_protobuf.main import grpc\nsys.exit(grpc())\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    return plugin


def generate() -> list[Path]:
    """Writes the four generated files; returns their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="reclra-protogen-") as tmp:
        plugin = _mypy_grpc_plugin(Path(tmp))
        # grpc_tools ships the well-known .proto files (none imported today) under its package
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT}",
                f"-I{well_known}",
                f"--plugin=protoc-gen-mypy_grpc={plugin}",
                f"--python_out={ROOT}",
                f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}",
                f"--mypy_grpc_out={ROOT}",
                os.path.join(ROOT, PROTO),
            ]
        )
    if code != 0:
        raise RuntimeError(f"protogen: protoc failed on {PROTO} (exit {code}); see its output")
    paths = [HERE / name for name in OUTPUTS]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"protogen: protoc wrote no {', '.join(missing)}")
    return paths


if __name__ == "__main__":
    for path in generate():
        print(f"protogen: {path.relative_to(ROOT)}")
