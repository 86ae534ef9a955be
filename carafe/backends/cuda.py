"""The CUDA backend: the kernels in the repository's ``cuda/`` folder, compiled at run time through CuPy (NVRTC).

CuPy is imported lazily, only when this backend runs, so ``carafe`` imports with torch alone. The compiled module is
cached per (device, dtype) — never per shape; sizes are kernel arguments. Kernels run on PyTorch's current stream,
directly on the tensors' memory (device pointers are passed by value).

Layout: the kernels read and write NCHW-contiguous tensors; other layouts are made contiguous first, and a result
whose input was channels_last is returned channels_last. The feature gradient is a gather (no atomics), so forward
and backward are bitwise reproducible.

Autocast: the op itself is not autocast; features and masks must share a dtype (the public op checks). Under
``torch.autocast`` CARAFEPack's softmax normaliser yields float32 kernels, so with float32 features the reassembly
runs in float32; with half-precision features it runs in half precision (accumulating in float32).

Timing: ``reassemble(features, masks, k, G, s, up)`` is the whole op (one kernel launch for the forward pass; the
first call per device and dtype compiles, so warm up before timing). ``compile_sources(arch)`` compiles every
kernel without a GPU and returns the NVRTC log (the CI compile check uses it).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from carafe.backends.function import (KERNELS, check_storage, is_channels_last, kernel_operand,
                                     kernel_unavailable_reason, run_kernel)

# An installed wheel carries the sources as carafe/cuda (mapped from cuda/ at build time); a checkout has cuda/.
_PACKAGED_SOURCES = Path(__file__).resolve().parents[1] / "cuda"
CUDA_SOURCE_DIR = _PACKAGED_SOURCES if _PACKAGED_SOURCES.is_dir() else Path(__file__).resolve().parents[2] / "cuda"
KERNEL_SOURCE = CUDA_SOURCE_DIR / "carafe_kernels.cu"
SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
THREADS_PER_BLOCK = 256
# Work split of the kernels; must equal kChannelsPerThread and kTapsPerThread in cuda/carafe_reassemble.cuh.
CHANNELS_PER_THREAD = 4
TAPS_PER_THREAD = 16
_MAX_BLOCKS = 2**31 - 1
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
INSTALL_HINT = "install CuPy for your CUDA version, e.g. `pip install cupy-cuda13x` (the project's `cuda` extra)"


class CompileError(RuntimeError):
    """NVRTC rejected the kernel sources; the message holds the compiler log."""


def _cupy() -> ModuleType:
    import cupy

    return cupy


def kernel_source() -> str:
    """``cuda/carafe_kernels.cu`` with its local ``#include "..."`` headers pasted in, so the text CuPy hashes for
    its on-disk kernel cache changes whenever any of the files changes."""
    if not KERNEL_SOURCE.is_file():
        raise FileNotFoundError(
            f"CUDA kernel sources not found at {KERNEL_SOURCE}: the CUDA backend reads them from the repository's "
            "top-level cuda/ folder (or the carafe/cuda folder of an installed wheel); reinstall the package")

    def expand(path: Path, seen: frozenset[Path]) -> str:
        def include(match: re.Match[str]) -> str:
            header = (path.parent / match.group(1)).resolve()
            if header in seen:
                return ""
            return expand(header, seen | {header})

        return _LOCAL_INCLUDE.sub(include, path.read_text())

    return expand(KERNEL_SOURCE, frozenset({KERNEL_SOURCE.resolve()}))


def cuda_include_dirs() -> list[str]:
    """Folders holding ``cuda_fp16.h`` / ``cuda_bf16.h``: the CUDA toolkit CuPy found (pip wheels, conda or a
    system install)."""
    cupy = _cupy()
    root = cupy.cuda.get_cuda_path()
    dirs = []
    if root is not None and (Path(root) / "include" / "cuda_fp16.h").is_file():
        dirs.append(str(Path(root) / "include"))
    return dirs


def compile_options(dtype_suffix: str | None = None) -> tuple[str, ...]:
    options = ["--std=c++17", *(f"-I{d}" for d in cuda_include_dirs())]
    if dtype_suffix is not None:
        options.append(f"-DCARAFE_ONLY_{dtype_suffix.upper()}")
    return tuple(options)


def compile_sources(arch: str, warnings_as_errors: bool = True, dtype_suffix: str | None = None) -> str:
    """Compile the kernels to PTX for ``arch`` (e.g. ``"compute_80"``) through NVRTC, without needing a GPU: all
    dtypes, or only ``dtype_suffix`` (``"f16"``...) as the loader does. Returns the NVRTC log; raises
    ``CompileError`` if compilation fails (with ``warnings_as_errors``, any warning fails it) or a kernel is missing
    from the PTX."""
    from cupy_backends.cuda.libs import nvrtc

    options = [f"--gpu-architecture={arch}", *compile_options(dtype_suffix)]
    if warnings_as_errors:
        options.append("-Werror=all-warnings")
    program = nvrtc.createProgram(kernel_source(), KERNEL_SOURCE.name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as err:
            raise CompileError(f"NVRTC failed on {KERNEL_SOURCE} for {arch} ({err}):\n"
                               f"{nvrtc.getProgramLog(program)}") from None
        log = nvrtc.getProgramLog(program)
        ptx = nvrtc.getPTX(program)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(program)
    missing = [name for name in kernel_names(dtype_suffix) if f".entry {name}(" not in ptx]
    if missing:
        raise CompileError(f"kernels missing from the PTX for {arch}: {missing}")
    return log


def kernel_names(dtype_suffix: str | None = None) -> list[str]:
    suffixes = SUFFIXES.values() if dtype_suffix is None else [dtype_suffix]
    return [f"carafe_{kernel}_{suffix}" for suffix in suffixes for kernel in KERNELS]


@functools.lru_cache(maxsize=None)
def _module(device_index: int, dtype: torch.dtype):
    """The compiled kernels for one device and dtype (CuPy compiles for that device's architecture)."""
    cupy = _cupy()
    suffix = SUFFIXES[dtype]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=compile_options(suffix))
        try:
            return {kernel: module.get_function(f"carafe_{kernel}_{suffix}") for kernel in KERNELS}
        except cupy.cuda.compiler.CompileException as err:
            raise CompileError(f"compiling {KERNEL_SOURCE} for {dtype} on cuda:{device_index} failed:\n{err}") from None


def _cupy_stream(device: torch.device):
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    # CuPy 14 prefers the CUDA stream protocol; older torch streams do not implement it.
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


def work_items(kernel: str, geometry: tuple[int, ...]) -> int:
    """Threads a kernel needs (one per work item, as numbered in cuda/carafe_reassemble.cuh)."""
    n, c, h, w, out_h, out_w, k, groups, _, _ = geometry
    channel_chunks = -(-(c // groups) // CHANNELS_PER_THREAD)
    tap_chunks = -(-(k * k) // TAPS_PER_THREAD)
    return {"forward": n * groups * channel_chunks * out_h * out_w,
            "backward_features": n * groups * channel_chunks * h * w,
            "backward_masks": n * groups * tap_chunks * out_h * out_w}[kernel]


def launch(kernel: str, a: Tensor, b: Tensor, out: Tensor, geometry: tuple[int, ...]) -> Tensor:
    """Run ``kernel`` on NCHW-contiguous ``a``, ``b`` writing ``out``; geometry = (n, c, h, w, out_h, out_w, k,
    groups, sigma, up)."""
    import numpy

    for name, t in (("a", a), ("b", b), ("out", out)):
        check_storage(t, f"{kernel}'s operand {name}")
    items = work_items(kernel, geometry)
    if items == 0:
        return out
    blocks = min(-(-items // THREADS_PER_BLOCK), _MAX_BLOCKS)
    fn = _module(out.device.index, out.dtype)[kernel]
    args = (*(numpy.uint64(t.data_ptr()) for t in (a, b, out)), *(numpy.int64(v) for v in geometry))
    with _cupy().cuda.Device(out.device.index), _cupy_stream(out.device):
        fn((blocks,), (THREADS_PER_BLOCK,), args)
    return out


def _run(kernel: str, a: Tensor, b: Tensor, shape: tuple, layout_of: Tensor, geometry: tuple) -> Tensor:
    """Run ``kernel`` on NCHW-contiguous copies of a, b (no copy if already so); channels_last in, channels_last out."""
    a, b = kernel_operand(a).contiguous(), kernel_operand(b).contiguous()
    out = launch(kernel, a, b, torch.empty(shape, dtype=a.dtype, device=a.device), geometry)
    return out.contiguous(memory_format=torch.channels_last) if is_channels_last(layout_of) else out


class CUDABackend:
    def unavailable_reason(self, features: Tensor) -> str | None:
        if features.device.type != "cuda":
            return f"it runs on CUDA tensors only, got a tensor on {features.device}; move it with .cuda()"
        if features.dtype not in SUFFIXES:
            return f"it supports float16, bfloat16, float32 and float64, got {features.dtype}"
        try:
            cupy = _cupy()
        except ImportError as err:
            return f"CuPy is not installed ({err}); {INSTALL_HINT}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as err:  # CuPy raises its own runtime error types, which differ between versions
            return f"CuPy cannot use the GPU: {err} (is the NVIDIA driver installed and recent enough?)"
        if count == 0:
            return "CuPy sees no CUDA device"
        if not KERNEL_SOURCE.is_file():
            return f"the kernel sources are missing: {KERNEL_SOURCE} does not exist (use a source checkout)"
        return kernel_unavailable_reason(features)

    def compute(self, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None, kernel_size: int,
                group_size: int, scale_factor: int, up: bool) -> Tensor:
        return run_kernel(_run, kernel, features, masks, grad_out, kernel_size, group_size, scale_factor, up)


BACKEND = CUDABackend()
