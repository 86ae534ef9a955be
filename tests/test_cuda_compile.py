"""Every CUDA kernel source compiles through NVRTC, warnings treated as errors; no GPU needed.

NVRTC (shipped with CuPy's CUDA wheels) compiles to PTX without a device or driver, so this runs in CI. It skips
only when CuPy itself is missing; a compile error or warning fails it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("cupy", reason="CuPy is not installed (the `cuda` extra); cannot run NVRTC")
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="this CuPy build has no NVRTC bindings")

from carafe.backends import cuda as cuda_backend  # noqa: E402

# Volta (7.0), Ampere (8.0), Hopper (9.0); 7.5 is the oldest target of CUDA 13's NVRTC, which dropped Volta.
ARCHES = (70, 75, 80, 90)


@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
def test_kernels_compile_without_warnings(arch: int):
    supported = nvrtc.getSupportedArchs()
    if arch not in supported:
        major, minor = nvrtc.getVersion()
        pytest.skip(f"NVRTC {major}.{minor} cannot target compute_{arch} (it supports {min(supported)} and newer); "
                    "the oldest supported target is compiled by another case")
    log = cuda_backend.compile_sources(f"compute_{arch}", warnings_as_errors=True)
    assert log.strip() == "", f"NVRTC printed diagnostics for compute_{arch}:\n{log}"


def test_headers_found():
    assert cuda_backend.cuda_include_dirs(), "no CUDA include folder with cuda_fp16.h was found through CuPy"


def test_compile_error_is_reported(monkeypatch):
    monkeypatch.setattr(cuda_backend, "kernel_source", lambda: "extern \"C\" __global__ void broken( {")
    with pytest.raises(cuda_backend.CompileError, match="NVRTC failed"):
        cuda_backend.compile_sources("compute_80")


def test_warning_fails_compilation(monkeypatch):
    source = 'extern "C" __global__ void unused_variable(float* out) { int unused; out[0] = 1.0f; }'
    monkeypatch.setattr(cuda_backend, "kernel_source", lambda: source)
    with pytest.raises(cuda_backend.CompileError, match="unused"):
        cuda_backend.compile_sources("compute_80")


@pytest.mark.parametrize("suffix", sorted(cuda_backend.SUFFIXES.values()))
def test_single_dtype_module_compiles(suffix: str):
    """The loader compiles one dtype per module (-DCARAFE_ONLY_<SUFFIX>); that variant compiles cleanly too."""
    log = cuda_backend.compile_sources("compute_80", warnings_as_errors=True, dtype_suffix=suffix)
    assert log.strip() == "", log
