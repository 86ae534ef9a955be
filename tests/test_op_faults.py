"""Faults around the operator: tensors without memory, a damaged build cache, lazy sign bits, misleading messages.

Calls that could crash the interpreter (a kernel handed address 0, a truncated shared library) run in a child
process, so a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

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

OPS = {"up": carafe.carafe, "down": carafe.carafe_down}


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode >= 0, f"the child process died from signal {-result.returncode}:\n{result.stderr}"
    return result


# --- tensors without real storage never reach a kernel ------------------------------------------------------------

def test_fake_and_meta_tensors_trace_without_a_kernel():
    result = run_python("""
        import torch, carafe
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            x, m = torch.randn(2, 8, 5, 6), torch.randn(2, 9, 10, 12)
            up = carafe.carafe(x, m, 3, 1, 2)
            down = carafe.carafe_down(x, torch.randn(2, 9, 3, 3), 3, 1, 2)
        meta = carafe.carafe(torch.empty(2, 8, 5, 6, device="meta"), torch.empty(2, 9, 10, 12, device="meta"), 3, 1, 2)
        print(tuple(up.shape), tuple(down.shape), meta.device, tuple(meta.shape))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(2,", "8,", "10,", "12)", "(2,", "8,", "3,", "3)", "meta", "(2,", "8,", "10,",
                                     "12)"]


def test_the_compiled_kernels_refuse_fake_tensors():
    # The guard under every entry point: even called directly, the ctypes path raises instead of writing to 0.
    with FakeTensorMode():
        x, m = torch.randn(1, 4, 3, 3), torch.randn(1, 9, 6, 6)
        with pytest.raises(RuntimeError, match="need tensors with real memory, but .* is a FakeTensor"):
            cpu_backend.BACKEND.compute("forward", x, m, None, 3, 1, 2, True)
        # Through the public op, the dispatcher sends fake tensors to the shape function, whatever the backend.
        with use_backend("cpu"):
            assert carafe.carafe(x, m, 3, 1, 2).shape == (1, 4, 6, 6)
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


def test_a_truncated_cached_library_is_rebuilt(tmp_path):
    first = run_python(BUILD, CARAFE_BUILD_DIR=str(tmp_path))
    assert first.returncode == 0, first.stderr
    library = Path(first.stdout.split()[0])
    # Every 3x3 window of the 2x2 map holds all four ones: 2 channels x 16 outputs x 4 = 128.
    assert float(first.stdout.split()[1]) == 128.0
    assert cpu_backend.is_valid_build(library)
    library.write_bytes(library.read_bytes()[:4096])  # what a full disk or a killed copy leaves
    assert not cpu_backend.is_valid_build(library)
    second = run_python(BUILD, CARAFE_BUILD_DIR=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert cpu_backend.is_valid_build(library)


def test_a_library_without_its_recorded_digest_is_not_trusted(tmp_path):
    library = tmp_path / "reassemble_cpu-0123456789abcdef.so"
    library.write_bytes(b"\x7fELF")
    assert not cpu_backend.is_valid_build(library)


def test_stale_temporary_files_of_a_killed_build_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".reassemble_cpu-0123456789abcdef.so.{dead.pid}.tmp"
    live = tmp_path / f".reassemble_cpu-0123456789abcdef.so.{os.getppid()}.tmp"
    stale.write_bytes(b"half a library")
    live.write_bytes(b"another process is still writing this")
    result = run_python(BUILD, CARAFE_BUILD_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.exists()


def test_an_unwritable_cache_says_writing_failed(tmp_path):
    # A path below a regular file cannot be created, whoever runs the test (root ignores permission bits).
    (tmp_path / "file").write_text("")
    result = run_python("""
        import warnings, torch, carafe
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            carafe.carafe(torch.ones(1, 2, 2, 2), torch.ones(1, 9, 4, 4), 3, 1, 2)
        print([str(w.message) for w in caught])
    """, CARAFE_BUILD_DIR=str(tmp_path / "file" / "cache"))
    assert result.returncode == 0, result.stderr
    assert "writing the compiled kernels to" in result.stdout and "CARAFE_BUILD_DIR" in result.stdout
    assert "loading" not in result.stdout


def test_a_failing_compiler_is_named_with_what_to_do(tmp_path):
    result = run_python("""
        import torch, carafe
        try:
            with carafe.use_backend("cpu"):
                carafe.carafe(torch.ones(1, 2, 2, 2), torch.ones(1, 9, 4, 4), 3, 1, 2)
        except carafe.BackendUnavailableError as err:
            print(err)
    """, CXX="false", CARAFE_BUILD_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "the C++ compiler 'false' failed" in result.stdout and "exit status 1" in result.stdout
    assert "(the compiler printed nothing)" in result.stdout and "Set CXX to a working C++17 compiler" in result.stdout


# --- negative-bit views ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_negative_bit_views_keep_their_sign(direction, backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 5, generator=gen, dtype=torch.float64)
    out_hw = (10, 10) if direction == "up" else (3, 3)
    m = torch.randn(1, 9, *out_hw, generator=gen, dtype=torch.float64)
    x_neg, m_neg = torch._neg_view(x), torch._neg_view(m)
    assert x_neg.is_neg() and m_neg.is_neg()
    with use_backend(backend):
        plain = OPS[direction](x, m, 3, 1, 2)
        torch.testing.assert_close(OPS[direction](x_neg, m, 3, 1, 2), -plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(OPS[direction](x, m_neg, 3, 1, 2), -plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(OPS[direction](x_neg, m_neg, 3, 1, 2), plain, rtol=0, atol=1e-12)


# --- NaN in a mask tap outside the map ---------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_weights_of_taps_outside_the_map_contribute_zero(direction, backend):
    # A 1x1 map with k = 3: only the centre tap (index 4) lies inside, so out = x * centre weight exactly, and the
    # gradient of x is the centre weight times grad_out, whatever the eight outside weights hold.
    out_hw = (2, 2) if direction == "up" else (1, 1)
    x = torch.full((1, 2, 1, 1), 3.0, dtype=torch.float64, requires_grad=True)
    m = torch.full((1, 9, *out_hw), float("nan"), dtype=torch.float64)
    m[:, 4] = 0.5
    m[:, 0] = float("inf")
    m.requires_grad_()
    with use_backend(backend):
        out = OPS[direction](x, m, 3, 1, 2)
    assert torch.equal(out, torch.full((1, 2, *out_hw), 1.5, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.5 * out_hw[0] * out_hw[1]))
    expected_mask_grad = torch.zeros_like(m)
    expected_mask_grad[:, 4] = 2 * 3.0  # two channels of value 3 read the centre tap
    assert torch.equal(m.grad, expected_mask_grad)
