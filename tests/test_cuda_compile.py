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


# Modules as the loader builds them (one dtype, kernel-size variant, index width and layout each): per
# architecture, the half-precision ones (their headers differ per architecture), a run-time-k 64-bit one and a
# channels_last one. Every variant of every dtype is compiled by test_every_variant_compiles (NCHW) and
# test_every_nhwc_variant_compiles.
MODULES = (("f16", "k5", 32, "nchw"), ("bf16", "k3", 64, "nchw"), ("f32", "kx", 64, "nchw"), ("bf16", "k7", 32, "nhwc"))


def _require(arch: int) -> None:
    supported = nvrtc.getSupportedArchs()
    if arch not in supported:
        major, minor = nvrtc.getVersion()
        pytest.skip(f"NVRTC {major}.{minor} cannot target compute_{arch} (it supports {min(supported)} and newer); "
                    "the oldest supported target is compiled by another case")


@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
def test_kernels_compile_without_warnings(arch: int):
    _require(arch)
    for suffix, variant, bits, layout in MODULES:
        log = cuda_backend.compile_sources(f"compute_{arch}", warnings_as_errors=True, dtype_suffix=suffix,
                                           variant=variant, index_bits=bits, layout=layout)
        assert log.strip() == "", \
            f"NVRTC printed diagnostics for compute_{arch} {suffix} {variant} i{bits} {layout}:\n{log}"


@pytest.mark.slow
def test_every_variant_compiles():
    """All 120 NCHW kernels (4 dtypes x 5 kernel-size variants x 2 index widths x 3 passes) in one program,
    warnings as errors (about 10 s of CPU)."""
    log = cuda_backend.compile_sources("compute_80", warnings_as_errors=True, layout="nchw")
    assert log.strip() == "", log


def test_every_nhwc_variant_compiles():
    """All 120 channels_last kernels in one program, warnings as errors, without device optimisation (-G: the
    same front end, templates and warnings in a few seconds instead of about 30; the optimised build of every
    kernel is the static report's, `make bench-cuda-static`, and of one NHWC module per architecture above)."""
    log = cuda_backend.compile_sources("compute_80", warnings_as_errors=True, layout="nhwc", device_debug=True)
    assert log.strip() == "", log
    assert len(cuda_backend.kernel_names(layout="nhwc")) == 120


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


def test_missing_include_path(monkeypatch):
    """Without the CUDA headers, float32 / float64 still compile and the half-precision kernels fail at load with
    a message that says what is missing and how to get it (not NVRTC's 'cannot open source file')."""
    monkeypatch.setattr(cuda_backend, "cuda_include_dirs", lambda: [])
    log = cuda_backend.compile_sources("compute_80", dtype_suffix="f32", variant="k5", index_bits=32)
    assert log.strip() == ""
    for suffix in ("f16", "bf16", None):
        with pytest.raises(cuda_backend.MissingHeadersError, match=r"cuda_fp16\.h.*CUDA_PATH.*float32"):
            cuda_backend.compile_options(suffix)
