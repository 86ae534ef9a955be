"""The CPU backend's build-on-first-use failure path, and a smoke run of the benchmark script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import warnings, torch, carafe
x, m = torch.randn(1, 4, 3, 3), torch.softmax(torch.randn(1, 9, 6, 6), 1)
try:
    with carafe.use_backend("cpu"):
        carafe.carafe(x, m, 3, 1, 2)
except carafe.BackendUnavailableError as err:
    print("FORCED:", err)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = carafe.carafe(x, m, 3, 1, 2)
print("AUTO:", tuple(out.shape), [str(w.message) for w in caught])
"""


def test_missing_compiler_is_an_error_when_forced_and_a_warning_in_auto(tmp_path):
    # CARAFE_CXXFLAGS asks for a build with other flags than the installation's prebuilt libraries, so the kernels
    # must be compiled (tests/test_wheel.py runs the prebuilt ones without a compiler).
    env = dict(os.environ, CXX="no-such-compiler-xyz", CARAFE_BUILD_DIR=str(tmp_path), CARAFE_CXXFLAGS="-O0")
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "FORCED: CARAFE backend 'cpu' cannot run this call: no C++ compiler: 'no-such-compiler-xyz'" in result.stdout
    assert "AUTO: (1, 4, 6, 6)" in result.stdout and "using the slow 'reference' backend" in result.stdout


def test_benchmark_script_writes_its_report(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "bench_op.py"), "--sizes", "5", "6x7", "--batch1-sizes", "4x6",
           "--channels", "8", "--min-time", "0", "--max-repeats", "3", "--out-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "op-cpu.md").read_text()
    for needle in ("fp32 matmul rate", "## up (2, 8, 5, 5)", "## down (2, 8, 6, 7)", "## up (1, 8, 4, 6)", "| fast |",
                   "| naive unfold |", "| deconv 3x3 |", "| pixel shuffle |", "| dysample |", "| CARAFEPack |",
                   "| strided conv 3x3 |", "| CARAFEDownPack |", "fp32 matmul in these rounds", "**commit**",
                   "**threads**: 2", "CARAFEPack takes"):
        assert needle in report, needle
    rows = (tmp_path / "op-cpu.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 9 + 3 * 7  # header, 3 sizes x (9 up methods + 7 down methods)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
