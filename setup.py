"""Generates the gRPC stubs from driver/api/reclra.proto whenever the package is built."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))


class BuildWithStubs(build_py):
    def run(self) -> None:
        from driver.api.protogen import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
