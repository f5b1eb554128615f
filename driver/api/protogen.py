"""Generate the message classes for driver/api/reclra.proto (run at build and install time)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate() -> None:
    from grpc_tools import protoc

    # Messages only: driver/api/service.py wires the methods itself from its METHODS table.
    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", str(HERE / "reclra.proto")])
    if code != 0:
        raise RuntimeError("protoc failed on driver/api/reclra.proto")


if __name__ == "__main__":
    generate()
