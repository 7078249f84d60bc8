"""Generates the gRPC stubs from ../../proto/api.proto into the package while it is built."""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def stubs_module():
    """waft_client/_stubs.py, loaded on its own (the package needs its stubs to import)."""
    spec = importlib.util.spec_from_file_location("waft_stubs", os.path.join(HERE, "waft_client", "_stubs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        stubs = stubs_module()
        stubs.generate(stubs.find_proto(), os.path.join(self.build_lib, "waft_client"))


setup(cmdclass={"build_py": BuildWithStubs})
