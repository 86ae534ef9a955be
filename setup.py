"""Builds the CPU kernels into the package at install time (everything else is declared in pyproject.toml).

``carafe/build.py`` compiles ``carafe/csrc/reassemble_cpu.cpp`` once per instruction-set level into
``carafe/_native/`` (a wheel's copy, or the source tree's for an editable install). The libraries have a C ABI and
no Python or libtorch dependency, so the wheel is tagged ``py3-none-<platform>``. Without a compiler the install
still succeeds, with a message, and the kernels are compiled on first use instead. ``CARAFE_BUILD_LEVELS`` chooses
the levels (``all`` by default, ``host``, ``none`` or a list).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent


def _build_module():
    # By path: importing the carafe package would import torch, which the isolated build environment lacks.
    spec = importlib.util.spec_from_file_location("_carafe_build", HERE / "carafe" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """``build_ext`` for the C-ABI kernel libraries (not Python extension modules)."""

    def run(self) -> None:
        build = _build_module()
        levels = build.install_levels()
        in_source = HERE / "carafe" / "_native"
        target = in_source if (self.inplace or self.editable_mode) else Path(self.build_lib) / "carafe" / "_native"
        self._outputs = []
        if target != in_source:  # a build folder left from an earlier build must not lend the wheel its libraries
            shutil.rmtree(target, ignore_errors=True)
        if not levels:
            print("carafe: CARAFE_BUILD_LEVELS=none: no kernels built; they compile on first use")
            return
        try:
            # A wheel built from a tree whose editable install compiled the same source with the same flags and
            # compiler copies those libraries instead of compiling them again.
            manifest = build.build_prebuilt(target, levels, reuse_from=in_source if in_source.is_dir() else None)
        except build.BuildError as err:
            print(f"carafe: the CPU kernels were not built ({err}); they compile on first use instead")
            return
        if target != in_source:
            self._outputs = [str(target / build.MANIFEST_NAME)] + [
                str(target / entry["file"]) for entry in manifest["levels"].values()]

    def get_outputs(self) -> list[str]:
        return list(getattr(self, "_outputs", []))

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class PlatformWheel(bdist_wheel):
    """A wheel for one platform but any Python 3: the libraries do not link against Python."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = os.environ.get("CARAFE_BUILD_LEVELS", "all").strip() == "none"

    def get_tag(self) -> tuple[str, str, str]:
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


class WithKernels(Distribution):
    def has_ext_modules(self) -> bool:  # so that `build` runs build_ext and the wheel is not pure
        return True


setup(distclass=WithKernels, cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel})
