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


# --- extreme scale factors and dtypes (issue 26) ------------------------------------------------------------------

EXTREME = """
    import resource, torch, carafe
    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))  # a regression fails fast, not the machine
    torch.manual_seed(0)
    with carafe.use_backend("cpu"):  # the first call's one-time costs (dispatcher, library) before measuring
        carafe.carafe_down(torch.ones(1, 1, 1, 1), torch.ones(1, 9, 1, 1), 3, 1, 1)
    for h, w, s in [(3, 3, 2**24), (3, 3, 2**62), (2**17, 1, 2**17)]:
        x = torch.randn(1, 2, h, w, dtype=torch.float64)
        m = torch.randn(1, 9, (h - 1) // s + 1, (w - 1) // s + 1, dtype=torch.float64)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with carafe.use_backend("cpu"):
            out = carafe.carafe_down(x, m, 3, 1, s)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        # Output (0, 0) reassembles the window centred at input (0, 0): of its taps, those at (ky, kx) >= (1, 1).
        expected = sum(x[0, :, ky - 1, kx - 1] * m[0, ky * 3 + kx, 0, 0]
                       for ky in (1, 2) for kx in (1, 2) if ky - 1 < h and kx - 1 < w)
        close = torch.allclose(out[0, :, 0, 0], expected, rtol=1e-12, atol=1e-12)
        print(f"{h}x{w}/{s}", "x".join(map(str, out.shape)), close, grown, flush=True)
"""


def test_a_scale_factor_beyond_the_map_gives_one_output_in_bounded_memory():
    # Down-sampling by sigma >= the map's size leaves one output; the kernel's buffers once grew with sigma (a 3x3
    # map by 2^24 asked for 58 GB and crashed; a 2^17 x 1 map by 2^17, 450 MB for 2 MB of input). One child
    # process for all cases, its address space capped.
    result = run_python(EXTREME)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")[:-1]
    assert [line.split()[:3] for line in lines] == [
        [case, "1x2x1x1", "True"] for case in (f"3x3/{2**24}", f"3x3/{2**62}", f"{2**17}x1/{2**17}")]
    for line in lines:
        assert int(line.split()[3]) < 32, f"{line}: the call grew the process by that many MB"


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("s", [3, 4, 5, 6, 11])
def test_scale_factors_past_the_maps_width_match_the_loops(layout, s):
    # Phases of the de-interleaved rows past the map's width are shared (all zero): forward and both gradients
    # against the float64 loops and the reference backend's autograd.
    from conftest import brute_force

    torch.manual_seed(s)
    x = torch.randn(2, 4, 9, 4, dtype=torch.float64)
    m = torch.randn(2, 2 * 25, (9 - 1) // s + 1, (4 - 1) // s + 1, dtype=torch.float64)
    grad = torch.randn(2, 4, *m.shape[2:], dtype=torch.float64)
    if layout == "channels_last":
        x, m, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, m, grad))
    results = {}
    for backend in ("cpu", "reference"):
        xs, ms = x.clone().requires_grad_(), m.clone().requires_grad_()
        with use_backend(backend):
            out = carafe.carafe_down(xs, ms, 5, 2, s)
            results[backend] = (out, *torch.autograd.grad(out, (xs, ms), grad))
    expected = brute_force(x.detach().numpy(), m.detach().numpy(), 5, 2, s, up=False)
    assert torch.allclose(results["cpu"][0], torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    for got, want in zip(results["cpu"], results["reference"]):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", [carafe.carafe, carafe.carafe_down])
def test_a_scale_factor_no_int64_holds_is_a_value_error_naming_it(op):
    x, m = torch.randn(1, 1, 3, 3), torch.randn(1, 9, 1, 1)
    with pytest.raises(ValueError, match=r"scale_factor must be <= 9223372036854775807 .*got 9223372036854775808"):
        op(x, m, 3, 1, 2**63)
    with pytest.raises(ValueError, match=r"scale_factor must be <= .*got 9223372036854775808"):
        carafe.CARAFEDownPack(channels=4, scale_factor=2**63)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_dtype_without_arithmetic_is_a_type_error_naming_it(dtype):
    x = torch.randn(1, 1, 3, 3).to(dtype)
    m = torch.randn(1, 9, 2, 2).to(dtype)
    with pytest.raises(TypeError, match=rf"features has dtype {dtype}, which the reassembly does not support"):
        carafe.carafe_down(x, m, 3, 1, 2)
