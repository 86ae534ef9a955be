"""The CUDA backend: the kernels in the repository's ``cuda/`` folder, compiled at run time through CuPy (NVRTC).

CuPy is imported lazily, only when this backend runs, so ``carafe`` imports with torch alone. Each call picks a
kernel variant on the host (``launch_plan``): the compiled-in kernel size for k in {1, 3, 5, 7} (``kx``, the run-time
size, otherwise), 32-bit indices when every tensor and work-item count of the call is at most 2^30 (64-bit
otherwise), and for the fixed-k forward pass the number of channel slices per group (1, so every mask value is read
once, unless that leaves too few threads to fill the device). A module holds the three kernels of one (dtype,
variant, index width) and is compiled once per device and cached (never per shape; sizes are kernel arguments).
Kernels run on PyTorch's current stream, directly on the tensors' memory (device pointers are passed by value).

Compilation happens on the first call that needs a variant, so call ``carafe.cuda_warmup()`` (``warmup`` here)
before capturing a CUDA graph: compiling inside a capture is refused with an error saying so. The float32 / float64
kernels need no CUDA headers; float16 / bfloat16 need ``cuda_fp16.h`` / ``cuda_bf16.h`` from the CUDA toolkit CuPy
finds, and a clear ``MissingHeadersError`` says so when they are absent.

Layout: the kernels read and write NCHW-contiguous tensors; other layouts are made contiguous first, and a result
whose input was channels_last is returned channels_last (there is no native NHWC kernel yet). The feature gradient
is a gather (no atomics), so forward and backward are bitwise reproducible.

Autocast: the op itself is not autocast; features and masks must share a dtype (the registered ops check every
tensor before a kernel sees a pointer). Under ``torch.autocast`` CARAFEPack's softmax normaliser yields float32
kernels, so with float32 features the reassembly runs in float32; with half-precision features it runs in half
precision (accumulating in float32).

Timing: one kernel launch per pass (``launch``); warm up before timing. ``compile_sources(arch)`` compiles kernels
without a GPU and returns the NVRTC log (the CI compile check uses it). docs/cuda.md describes the kernels and the
static performance report.
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
# Work split of the kernels; must equal kChannelsPerThread, kGradChannelsPerThread and kTapsPerThread in
# cuda/carafe_reassemble.cuh (a test checks).
CHANNELS_PER_THREAD = 4
GRAD_CHANNELS_PER_THREAD = 16
TAPS_PER_THREAD = 16
# Kernel sizes with a compiled-in variant (taps unrolled, weights in registers); any other odd size runs the
# run-time-k variant ("kx").
FIXED_KERNEL_SIZES = (1, 3, 5, 7)
# The 32-bit index kernels are used when every element count and work-item count of the call is at most this
# (so that no offset, and no item index plus the grid stride, overflows a signed 32-bit int).
MAX_32BIT_COUNT = 2**30
# Threads the fixed-k forward pass aims for before it splits a group's channels into slices (each slice re-reads
# the masks): enough to fill every SM of the device at the kernels' 50 % occupancy (1024 resident threads per SM).
THREADS_PER_SM = 1024
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


HALF_SUFFIXES = ("f16", "bf16")  # the modules that include cuda_fp16.h / cuda_bf16.h
VARIANTS = tuple(f"k{k}" for k in FIXED_KERNEL_SIZES) + ("kx",)
INDEX_BITS = (32, 64)


class MissingHeadersError(RuntimeError):
    """The fp16 / bf16 kernels need the CUDA headers cuda_fp16.h / cuda_bf16.h, and none were found."""


def cuda_include_dirs() -> list[str]:
    """Folders holding ``cuda_fp16.h`` / ``cuda_bf16.h``: the CUDA toolkit CuPy found (pip wheels, conda or a
    system install). Empty if there is none (the f32 / f64 kernels need no include folder)."""
    cupy = _cupy()
    root = cupy.cuda.get_cuda_path()
    dirs = []
    if root is not None and (Path(root) / "include" / "cuda_fp16.h").is_file():
        dirs.append(str(Path(root) / "include"))
    return dirs


def _include_options(dtype_suffix: str | None) -> list[str]:
    dirs = cuda_include_dirs()
    if not dirs and (dtype_suffix is None or dtype_suffix in HALF_SUFFIXES):
        root = _cupy().cuda.get_cuda_path()
        what = "float16 / bfloat16" if dtype_suffix is None else {"f16": "float16", "bf16": "bfloat16"}[dtype_suffix]
        raise MissingHeadersError(
            f"the CUDA backend's {what} kernels need the CUDA headers cuda_fp16.h and cuda_bf16.h, which were not "
            f"found (CuPy's CUDA path: {root}; looked in <path>/include). Install the CUDA runtime headers for your "
            "CUDA version (e.g. the nvidia-cuda-runtime wheel of the CUDA 13 toolkit, or a CUDA toolkit) or set "
            "CUDA_PATH to a toolkit that has them; float32 and float64 work without them")
    return [f"-I{d}" for d in dirs]


def compile_options(dtype_suffix: str | None = None, variant: str | None = None,
                    index_bits: int | None = None) -> tuple[str, ...]:
    """NVRTC options for one module: every kernel, or only one dtype / kernel-size variant / index width."""
    options = ["--std=c++17", *_include_options(dtype_suffix)]
    if dtype_suffix is not None:
        options.append(f"-DCARAFE_ONLY_{dtype_suffix.upper()}")
    if variant is not None:
        options.append(f"-DCARAFE_ONLY_K={0 if variant == 'kx' else int(variant[1:])}")
    if index_bits is not None:
        options.append(f"-DCARAFE_ONLY_INDEX={index_bits}")
    return tuple(options)


def compile_sources(arch: str, warnings_as_errors: bool = True, dtype_suffix: str | None = None,
                    variant: str | None = None, index_bits: int | None = None) -> str:
    """Compile the kernels to PTX for ``arch`` (e.g. ``"compute_80"``) through NVRTC, without needing a GPU: every
    variant, or only those of ``dtype_suffix`` (``"f16"``...), ``variant`` (``"k5"``, ``"kx"``...) and
    ``index_bits`` as the loader does. Returns the NVRTC log; raises ``CompileError`` if compilation fails (with
    ``warnings_as_errors``, any warning fails it) or a kernel is missing from the PTX."""
    from cupy_backends.cuda.libs import nvrtc

    options = [f"--gpu-architecture={arch}", *compile_options(dtype_suffix, variant, index_bits)]
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
    missing = [name for name in kernel_names(dtype_suffix, variant, index_bits) if f".entry {name}(" not in ptx]
    if missing:
        raise CompileError(f"kernels missing from the PTX for {arch}: {missing}")
    return log


def kernel_names(dtype_suffix: str | None = None, variant: str | None = None,
                 index_bits: int | None = None) -> list[str]:
    """Exported kernel names, all or those of one dtype / variant / index width."""
    suffixes = SUFFIXES.values() if dtype_suffix is None else [dtype_suffix]
    variants = VARIANTS if variant is None else [variant]
    widths = INDEX_BITS if index_bits is None else [index_bits]
    return [f"carafe_{kernel}_{v}_i{bits}_{suffix}" for suffix in suffixes for v in variants for bits in widths
            for kernel in KERNELS]


_MODULES: dict[tuple[int, torch.dtype, str, int], dict[str, object]] = {}


def _compiled(device_index: int, dtype: torch.dtype, variant: str, bits: int) -> dict[str, object]:
    """The three kernels of one (device, dtype, kernel-size variant, index width), compiled on first use (CuPy
    compiles for that device's architecture and caches the binary on disk)."""
    key = (device_index, dtype, variant, bits)
    if key in _MODULES:
        return _MODULES[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the CARAFE CUDA kernels for {dtype}, kernel size variant {variant}, {bits}-bit indices are not compiled "
            "yet, and compiling them inside CUDA graph capture would break the capture; call "
            "carafe.cuda_warmup(dtypes=..., kernel_sizes=...) (or run the model once) before capturing")
    cupy = _cupy()
    suffix = SUFFIXES[dtype]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=compile_options(suffix, variant, bits))
        try:
            functions = {name: module.get_function(name) for name in kernel_names(suffix, variant, bits)}
        except cupy.cuda.compiler.CompileException as err:
            raise CompileError(f"compiling {KERNEL_SOURCE} for {dtype} ({variant}, {bits}-bit indices) on "
                               f"cuda:{device_index} failed:\n{err}") from None
    _MODULES[key] = functions
    return functions


def warmup(device: torch.device | int | str | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
           kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)) -> list[str]:
    """Compile and load the kernels for ``dtypes`` (default: all four) and ``kernel_sizes`` (any other odd size
    loads the run-time-k variant) on ``device`` (default: the current CUDA device), both index widths, so that no
    later call compiles; returns the kernel names. Needed before CUDA graph capture, where compiling is refused
    (the binaries are cached on disk by CuPy, so later processes load them quickly)."""
    dtypes = tuple(SUFFIXES) if dtypes is None else tuple(dtypes)
    for dtype in dtypes:
        if dtype not in SUFFIXES:
            raise TypeError(f"carafe.cuda_warmup: dtype must be one of {list(SUFFIXES)}, got {dtype}")
    for k in kernel_sizes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"carafe.cuda_warmup: kernel sizes must be odd integers >= 1, got {k!r}")
    if device is None:
        index = torch.cuda.current_device()
    else:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"carafe.cuda_warmup: device must be a CUDA device, got {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
    names = []
    for dtype in dtypes:
        for variant in dict.fromkeys(kernel_variant(k) for k in kernel_sizes):
            for bits in INDEX_BITS:
                names += list(_compiled(index, dtype, variant, bits))
    _target_threads(index)  # queries the device properties once, outside any capture
    return names


def _cupy_stream(device: torch.device):
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    # CuPy 14 prefers the CUDA stream protocol; older torch streams do not implement it.
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


def kernel_variant(kernel_size: int) -> str:
    """``k1``, ``k3``, ``k5``, ``k7`` (compiled-in kernel size) or ``kx`` (run-time kernel size)."""
    return f"k{kernel_size}" if kernel_size in FIXED_KERNEL_SIZES else "kx"


def kernel_name(kernel: str, kernel_size: int, dtype: torch.dtype, index_bits: int) -> str:
    """The exported name of one kernel variant, e.g. ``carafe_forward_k5_i32_f32``."""
    return f"carafe_{kernel}_{kernel_variant(kernel_size)}_i{index_bits}_{SUFFIXES[dtype]}"


def work_items(kernel: str, geometry: tuple[int, ...]) -> int:
    """Threads a kernel needs (one per work item, as numbered in cuda/carafe_reassemble.cuh);
    geometry = (n, c, h, w, out_h, out_w, k, groups, sigma, up, slices)."""
    n, c, h, w, out_h, out_w, k, groups, _, _, slices = geometry
    fixed = k in FIXED_KERNEL_SIZES
    cg = c // groups
    if kernel == "forward":
        per_group = slices if fixed else -(-cg // CHANNELS_PER_THREAD)
        return n * groups * per_group * out_h * out_w
    if kernel == "backward_features":
        return n * groups * -(-cg // GRAD_CHANNELS_PER_THREAD) * h * w
    if kernel == "backward_masks":
        return n * groups * (1 if fixed else -(-(k * k) // TAPS_PER_THREAD)) * out_h * out_w
    raise ValueError(f"unknown reassembly kernel {kernel!r}; expected one of {KERNELS}")


def forward_slices(geometry: tuple[int, ...], target_threads: int) -> int:
    """Channel slices per group for the fixed-k forward pass: 1 (every mask value read once) unless that leaves
    fewer than ``target_threads`` threads; then the smallest power of two that reaches it, at most the group's
    channel count."""
    n, c, _, _, out_h, out_w, _, groups, _, _ = geometry[:10]
    pixels, cg, slices = n * groups * out_h * out_w, c // groups, 1
    while pixels * slices < target_threads and slices * 2 <= cg:
        slices *= 2
    return slices


def index_bits(geometry: tuple[int, ...]) -> int:
    """32 when every tensor of the call and every kernel's work items stay within MAX_32BIT_COUNT, else 64."""
    n, c, h, w, out_h, out_w, k, groups = geometry[:8]
    counts = [n * c * h * w, n * c * out_h * out_w, n * groups * k * k * out_h * out_w,
              *(work_items(kernel, (*geometry[:10], 1)) for kernel in KERNELS)]
    return 32 if max(counts) <= MAX_32BIT_COUNT else 64


def launch_plan(kernel: str, geometry: tuple[int, ...], dtype: torch.dtype, target_threads: int
                ) -> tuple[str, tuple[int, ...], int]:
    """(kernel name, the 11 geometry arguments with the slice count, work items) for one call;
    geometry = (n, c, h, w, out_h, out_w, k, groups, sigma, up)."""
    fixed = geometry[6] in FIXED_KERNEL_SIZES
    slices = forward_slices(geometry, target_threads) if kernel == "forward" and fixed else 1
    full = (*geometry, slices)
    return kernel_name(kernel, geometry[6], dtype, index_bits(geometry)), full, work_items(kernel, full)


@functools.lru_cache(maxsize=None)
def _target_threads(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count * THREADS_PER_SM


def launch(kernel: str, a: Tensor, b: Tensor, out: Tensor, geometry: tuple[int, ...]) -> Tensor:
    """Run ``kernel`` on NCHW-contiguous ``a``, ``b`` writing ``out``; geometry = (n, c, h, w, out_h, out_w, k,
    groups, sigma, up)."""
    import numpy

    for name, t in (("a", a), ("b", b), ("out", out)):
        check_storage(t, f"{kernel}'s operand {name}")
    device = out.device.index
    name, full, items = launch_plan(kernel, geometry, out.dtype, _target_threads(device))
    if items == 0:
        return out
    blocks = min(-(-items // THREADS_PER_BLOCK), _MAX_BLOCKS)
    fn = _compiled(device, out.dtype, kernel_variant(geometry[6]), index_bits(geometry))[name]
    args = (*(numpy.uint64(t.data_ptr()) for t in (a, b, out)), *(numpy.int64(v) for v in full))
    with _cupy().cuda.Device(device), _cupy_stream(out.device):
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
