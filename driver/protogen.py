"""Generate the gRPC stubs for driver/reclra.proto (run at build and install time)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate() -> None:
    from grpc_tools import protoc

    code = protoc.main(
        [
            "protoc",
            f"-I{HERE}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            str(HERE / "reclra.proto"),
        ]
    )
    if code != 0:
        raise RuntimeError("protoc failed on driver/reclra.proto")
    stub = HERE / "reclra_pb2_grpc.py"  # protoc imports its sibling by bare name
    stub.write_text(
        stub.read_text().replace("import reclra_pb2 as", "from driver import reclra_pb2 as")
    )


if __name__ == "__main__":
    generate()
