"""Faults around the compiled CPU backend: tensors without memory handed to a kernel directly, a damaged or
unwritable build cache, a failing compiler. (Faults of the op itself, such as negative-bit views and NaN weights of
taps outside the map, are part of the tester in tests/test_ops.py.)

Loading a damaged shared library could crash the interpreter, so that runs in a child process and a regression
fails the test instead of killing pytest.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import carafe
from carafe import use_backend
from carafe.backends import cpu as cpu_backend


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode >= 0, f"the child process died from signal {-result.returncode}:\n{result.stderr}"
    return result


# --- tensors without real storage never reach a kernel ------------------------------------------------------------

def test_the_compiled_kernels_refuse_fake_tensors():
    # The guard under every entry point: even called directly, the ctypes path raises instead of writing to 0.
    # (Through the public op, fake and meta tensors reach the shape function instead: tests/test_ops.py.)
    with FakeTensorMode():
        x, m = torch.randn(1, 4, 3, 3), torch.randn(1, 9, 6, 6)
        with pytest.raises(RuntimeError, match="need tensors with real memory, but .* is a FakeTensor"):
            cpu_backend.BACKEND.compute("forward", x, m, None, 3, 1, 2, True)
    with pytest.raises(RuntimeError, match="is a meta tensor"):
        meta_x, meta_m = torch.empty(1, 4, 3, 3, device="meta"), torch.empty(1, 9, 6, 6, device="meta")
        cpu_backend.BACKEND.compute("forward", meta_x, meta_m, None, 3, 1, 2, True)


# --- the build cache ---------------------------------------------------------------------------------------------

BUILD = """
    import torch, carafe
    from carafe.backends import cpu
    with carafe.use_backend("cpu"):
        out = carafe.carafe(torch.ones(1, 2, 2, 2), torch.ones(1, 9, 4, 4), 3, 1, 2)
    print(cpu.build_library(), out.sum().item())
"""


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Builds of the CPU kernels in this test go to an empty cache folder (returned) and are loaded afresh; the
    process's own loaded library is untouched. Extra flags (-O0, which also compiles in a few seconds instead of
    tens) make the installation's prebuilt libraries inapplicable, so the first-use build path is what runs."""
    monkeypatch.setenv("CARAFE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CARAFE_CXXFLAGS", "-O0")
    monkeypatch.setattr(cpu_backend, "_library_or_error", functools.lru_cache(maxsize=None)(cpu_backend._open_library))
    monkeypatch.setattr(carafe.backends, "_warned", set())  # so the fallback warning is issued again
    return tmp_path


def test_a_damaged_cache_is_repaired(fresh_build):
    library = cpu_backend.build_library()
    assert cpu_backend.is_valid_build(library)
    library.write_bytes(library.read_bytes()[:4096])  # what a full disk or a killed copy leaves
    assert not cpu_backend.is_valid_build(library)
    # Temporary files of a killed build are removed; those of a build still running (this process) are kept.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = fresh_build / f".{library.name}.{dead.pid}.tmp"
    live = fresh_build / f".{library.name}.{os.getpid()}.tmp"
    stale.write_bytes(b"half a library")
    live.write_bytes(b"another process is still writing this")
    # Loading the truncated library could crash the interpreter, so the rebuild runs in a child process.
    result = run_python(BUILD)
    assert result.returncode == 0, result.stderr
    # Every 3x3 window of the 2x2 map holds all four ones: 2 channels x 16 outputs x 4 = 128.
    assert result.stdout.split() == [str(library), "128.0"]
    assert "carafe: compiling the C++ kernels" in result.stderr  # the one-line notice while it compiles
    assert cpu_backend.is_valid_build(library)
    assert not stale.exists() and live.exists()


def test_a_library_without_its_recorded_digest_is_not_trusted(tmp_path):
    library = tmp_path / "reassemble_cpu-0123456789abcdef.so"
    library.write_bytes(b"\x7fELF")
    assert not cpu_backend.is_valid_build(library)


def test_an_unwritable_cache_says_writing_failed(fresh_build, monkeypatch):
    # A path below a regular file cannot be created, whoever runs the test (root ignores permission bits).
    (fresh_build / "file").write_text("")
    monkeypatch.setenv("CARAFE_BUILD_DIR", str(fresh_build / "file" / "cache"))
    with pytest.warns(RuntimeWarning) as caught:
        carafe.carafe(torch.ones(1, 2, 2, 2), torch.ones(1, 9, 4, 4), 3, 1, 2)
    message = " ".join(str(w.message) for w in caught)
    assert "writing the compiled kernels to" in message and "CARAFE_BUILD_DIR" in message
    assert "loading" not in message


def test_a_failing_compiler_is_named_with_what_to_do(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with use_backend("cpu"), pytest.raises(carafe.BackendUnavailableError) as error:
        carafe.carafe(torch.ones(1, 2, 2, 2), torch.ones(1, 9, 4, 4), 3, 1, 2)
    message = str(error.value)
    assert "the C++ compiler 'false' failed" in message and "exit status 1" in message
    assert "(the compiler printed nothing)" in message and "Set CXX to a working C++17 compiler" in message
