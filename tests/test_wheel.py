"""A wheel built from the repository carries the C++ and CUDA kernel sources and runs the op outside the repository.

The wheel goes into a fresh virtual environment that sees this environment's torch and numpy (through a .pth file,
to avoid downloading torch again) but not the repository; the op then runs from an unrelated folder.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).with_name("uv")

RUN_OUTSIDE = """
import pathlib, torch, carafe
from carafe.backends import cpu, cuda
assert "site-packages" in carafe.__file__, carafe.__file__
assert cuda.KERNEL_SOURCE.is_file() and cuda.KERNEL_SOURCE.parent == pathlib.Path(carafe.__file__).parent / "cuda"
x, m = torch.randn(2, 8, 5, 6, dtype=torch.float64), torch.randn(2, 9, 10, 12, dtype=torch.float64)
with carafe.use_backend("cpu"):
    fast = carafe.carafe(x, m, 3, 1, 2)
with carafe.use_backend("reference"):
    reference = carafe.carafe(x, m, 3, 1, 2)
torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
print("OK", carafe.__file__)
"""


@pytest.mark.skipif(not UV.is_file(), reason="uv is not installed in this environment (make setup installs it)")
def test_wheel_carries_the_kernels_and_runs_outside_the_repository(tmp_path):
    built = subprocess.run([str(UV), "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("carafe/csrc/reassemble_cpu.cpp", "carafe/cuda/carafe_kernels.cu",
                   "carafe/cuda/carafe_reassemble.cuh", "carafe/library.py"):
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
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([str(python), "-c", RUN_OUTSIDE], cwd=outside, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "CARAFE_BUILD_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK") and str(env) in result.stdout
