"""A wheel built from the repository carries the compiled CPU kernels and runs them outside the repository, in a
fresh environment with no C++ compiler on PATH, without compiling anything or falling back to the reference.

The wheel goes into a fresh virtual environment that sees this environment's torch and numpy (through a .pth file,
to avoid downloading torch again) but not the repository; the op then runs from an unrelated folder. Building the
wheel reuses the libraries that `make setup`'s editable install compiled from the same source, flags and compiler
(setup.py says so in its output), so the test does not compile them again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

import carafe
from carafe import build

REPO = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).with_name("uv")

RUN_OUTSIDE = """
import importlib.metadata, pathlib, shutil, sys, time, warnings, torch
assert not any(shutil.which(cxx) for cxx in ("g++", "c++", "cc", "clang++")), "a compiler is on PATH"
import carafe
from carafe.backends import cpu, cuda
assert "site-packages" in carafe.__file__, carafe.__file__
assert cuda.KERNEL_SOURCE.is_file() and cuda.KERNEL_SOURCE.parent == pathlib.Path(carafe.__file__).parent / "cuda"
x, m = torch.randn(2, 8, 5, 6, dtype=torch.float64), torch.randn(2, 9, 10, 12, dtype=torch.float64)
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a fallback to the reference backend would warn
    start = time.perf_counter()
    fast = carafe.carafe(x, m, 3, 1, 2)
    first_call = time.perf_counter() - start
assert "torch._dynamo" not in sys.modules, "the first call imported torch._dynamo (seconds)"
assert carafe.backends_used() == ["cpu"], carafe.backends_used()
with carafe.use_backend("reference"):
    reference = carafe.carafe(x, m, 3, 1, 2)
torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
print("LOADED", cpu.loaded_library()["source"], cpu.loaded_library()["path"])
print("VERSION", carafe.__version__, importlib.metadata.version("carafe-repro"))
print(f"FIRST_CALL {first_call:.3f}")
"""


def test_version_is_the_distributions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert carafe.__version__ == project["version"]
    assert project["name"] != "carafe"  # the package index's `carafe` is another project


@pytest.mark.skipif(not UV.is_file(), reason="uv is not installed in this environment (make setup installs it)")
def test_wheel_runs_the_compiled_kernels_without_a_compiler(tmp_path):
    built = subprocess.run([str(UV), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith(".whl") and "-py3-none-" in wheel.name, wheel.name  # one wheel for every Python 3
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    manifest = json.loads(archive.read("carafe/_native/manifest.json"))
    host = build.host_level()
    assert host in manifest["levels"], f"the wheel has no library for this CPU ({host}): {manifest['levels']}"
    for needed in ("carafe/csrc/reassemble_cpu.cpp", "carafe/cuda/carafe_kernels.cu", "carafe/py.typed",
                   "carafe/cuda/carafe_reassemble.cuh", "carafe/library.py", "carafe/build.py",
                   *(f"carafe/_native/{entry['file']}" for entry in manifest["levels"].values())):
        assert needed in names, f"{needed} missing from {wheel.name}: {names}"
    assert not any(name.startswith("tasks/") for name in names), "the reproduction code is not part of the library"

    env = tmp_path / "env"
    subprocess.run([str(UV), "venv", "--python", sys.executable, str(env)], check=True, capture_output=True)
    python = env / "bin" / "python"
    env_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # torch and numpy from this environment; the repository itself is not on the path (no editable finder).
    (env_site / "parent_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([str(UV), "pip", "install", "--python", str(python), "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    outside, no_compiler, cache = tmp_path / "elsewhere", tmp_path / "bin", tmp_path / "cache"
    for folder in (outside, no_compiler, cache):
        folder.mkdir()
    result = subprocess.run([str(python), "-c", RUN_OUTSIDE], cwd=outside, capture_output=True, text=True,
                            timeout=300, env={"PATH": str(no_compiler), "CARAFE_BUILD_DIR": str(cache),
                                              "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["LOADED"] == f"prebuilt {host} {env_site / 'carafe' / '_native' / build.library_name(host)}"
    assert lines["VERSION"] == f"{carafe.__version__} {carafe.__version__}"
    assert not list(cache.iterdir()), "something was compiled into the cache"
    print(f"first call in a fresh process: {lines['FIRST_CALL']} s")


# --- choosing the library: instruction-set levels, the prebuilt manifest, the cache ---------------------------------

x86_only = pytest.mark.skipif(not build.is_x86_64(), reason="the instruction-set levels are x86-64's")
V2 = {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "sse2"}


@x86_only
def test_levels_follow_the_cpu_flags():
    assert build.supported_levels({"sse2", "avx", "avx2"}) == ["x86-64"]  # no FMA / F16C: not x86-64-v3's AVX2
    assert build.supported_levels(V2 | {"avx", "avx2", "fma", "f16c"}) == ["x86-64", "avx2"]
    avx512 = V2 | {"avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512bw", "avx512dq"}
    assert build.supported_levels(avx512) == ["x86-64", "avx2", "avx512"]
    assert build.supported_levels(avx512 - {"avx512vl"}) == ["x86-64", "avx2"]


@pytest.fixture
def reload_cpu_library(monkeypatch: pytest.MonkeyPatch):
    """Each test loads the CPU library afresh (the process's own stays as it was)."""
    import functools

    from carafe.backends import cpu

    monkeypatch.setattr(cpu, "_library_or_error", functools.lru_cache(maxsize=None)(cpu._open_library))
    monkeypatch.setattr(carafe.backends, "_warned", set())
    return cpu


@x86_only
def test_every_prebuilt_level_this_cpu_runs_loads_and_matches_the_reference(monkeypatch, reload_cpu_library):
    import torch

    manifest = build.read_manifest()
    if manifest is None:
        pytest.skip(f"no prebuilt libraries in {build.PREBUILT_DIR} (installed with CARAFE_BUILD_LEVELS=none)")
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    m = torch.randn(2, 2 * 25, 10, 14, dtype=torch.float64)
    with carafe.use_backend("reference"):
        want = carafe.carafe(x, m, 5, 2, 2)
    levels = [level for level in build.supported_levels() if level in manifest["levels"]]
    assert build.host_level() in levels
    for level in levels:
        monkeypatch.setenv("CARAFE_CPU_LEVEL", level)
        reload_cpu_library._library_or_error.cache_clear()
        with carafe.use_backend("cpu"):
            got = carafe.carafe(x, m, 5, 2, 2)
        assert reload_cpu_library.loaded_library()["source"] == f"prebuilt {level}"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_prebuilt_library_is_used_only_for_its_source_flags_and_bytes(tmp_path, monkeypatch):
    manifest = build.read_manifest()
    if manifest is None:
        pytest.skip(f"no prebuilt libraries in {build.PREBUILT_DIR} (installed with CARAFE_BUILD_LEVELS=none)")
    level = build.host_level()
    entry = manifest["levels"][level]
    (tmp_path / entry["file"]).write_bytes((build.PREBUILT_DIR / entry["file"]).read_bytes())
    assert build.prebuilt_problem(level, tmp_path, manifest) is None
    edited = dict(manifest, source_sha256="0" * 64)
    assert "reassemble_cpu.cpp has changed" in build.prebuilt_problem(level, tmp_path, edited)
    monkeypatch.setenv("CARAFE_CXXFLAGS", "-O1")
    assert "other flags" in build.prebuilt_problem(level, tmp_path, manifest)
    monkeypatch.delenv("CARAFE_CXXFLAGS")
    (tmp_path / entry["file"]).write_bytes(b"\x7fELF truncated")
    assert "does not match its recorded SHA-256" in build.prebuilt_problem(level, tmp_path, manifest)
    assert "was installed without compiling" in build.prebuilt_problem(level, tmp_path / "none")


def test_the_cache_is_read_without_a_compiler(tmp_path, monkeypatch):
    # A valid cached build is found from its name alone: no compiler is run (or needed) to form the key.
    monkeypatch.setenv("CARAFE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("CARAFE_CXXFLAGS", "-O0")  # the prebuilt libraries do not apply
    level = build.host_level()
    target = build.cached_library_path(level)
    assert target.parent == tmp_path and level in target.name
    target.write_bytes(b"a library")
    build.digest_path(target).write_text(build.file_digest(target) + "\n")
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert build.build_library(level) == target
    assert build.library_to_load() == (target, f"cached {level} (not prebuilt: " + build.prebuilt_library()[1] + ")")


def test_the_default_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("CARAFE_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert build.cache_dir() == tmp_path / "carafe"


def test_the_fallback_warning_names_the_callers_line(tmp_path, monkeypatch, reload_cpu_library):
    import torch

    monkeypatch.setenv("CARAFE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("CARAFE_CXXFLAGS", "-O0")
    with pytest.warns(RuntimeWarning, match="using the slow 'reference' backend") as caught:
        carafe.CARAFEPack(4, 2, compressed_channels=4)(torch.randn(1, 4, 3, 3))
    assert [w.filename for w in caught] == [__file__]
