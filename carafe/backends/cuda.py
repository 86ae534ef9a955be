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

Layout: every kernel has an NCHW and a channels_last (NHWC) variant. A call whose features are channels_last runs
the NHWC kernels on the tensors' memory as it is (no transposes; masks may be channels_last or NCHW-contiguous, and
the mask gradient is written in the masks' layout); an output gradient in the other layout than the features is
converted first. Other calls run the NCHW kernels on NCHW-contiguous copies (no copy if already so). Results take
the layout of the input they belong to. The feature gradient is a gather (no atomics), so forward and backward are
bitwise reproducible.

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

# Memory layouts with their own kernels: "nchw" (contiguous) and "nhwc" (channels_last features, outputs and output
# gradients; masks either way).
LAYOUTS = ("nchw", "nhwc")

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
# The channels_last kernels' work split; must equal nhwc_lanes<T>() (32 bytes of channels per pixel and load),
# kNhwcForwardChannels, kNhwcGradChannels and kNhwcMaskChannels in cuda/carafe_reassemble.cuh (a test checks).
NHWC_LANE_BYTES = 32
NHWC_FORWARD_CHANNELS = 4
NHWC_GRAD_CHANNELS = 8
NHWC_MASK_CHANNELS = 3
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
                    index_bits: int | None = None, layout: str | None = None) -> tuple[str, ...]:
    """NVRTC options for one module: every kernel, or only one dtype / kernel-size variant / index width /
    layout."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    options = ["--std=c++17", *_include_options(dtype_suffix)]
    if dtype_suffix is not None:
        options.append(f"-DCARAFE_ONLY_{dtype_suffix.upper()}")
    if variant is not None:
        options.append(f"-DCARAFE_ONLY_K={0 if variant == 'kx' else int(variant[1:])}")
    if index_bits is not None:
        options.append(f"-DCARAFE_ONLY_INDEX={index_bits}")
    if layout is not None:
        options.append(f"-DCARAFE_ONLY_NHWC={int(layout == 'nhwc')}")
    return tuple(options)


def compile_sources(arch: str, warnings_as_errors: bool = True, dtype_suffix: str | None = None,
                    variant: str | None = None, index_bits: int | None = None, layout: str | None = None,
                    device_debug: bool = False) -> str:
    """Compile the kernels to PTX for ``arch`` (e.g. ``"compute_80"``) through NVRTC, without needing a GPU: every
    variant, or only those of ``dtype_suffix`` (``"f16"``...), ``variant`` (``"k5"``, ``"kx"``...),
    ``index_bits`` and ``layout`` (``"nchw"`` / ``"nhwc"``) as the loader does. ``device_debug`` compiles with
    ``-G`` (no device optimisation: the same front end, templates and warnings in a fraction of the time; the
    loader never uses it). Returns the NVRTC log; raises ``CompileError`` if compilation fails (with
    ``warnings_as_errors``, any warning fails it) or a kernel is missing from the PTX."""
    from cupy_backends.cuda.libs import nvrtc

    options = [f"--gpu-architecture={arch}", *compile_options(dtype_suffix, variant, index_bits, layout)]
    if warnings_as_errors:
        options.append("-Werror=all-warnings")
    if device_debug:
        options.append("--device-debug")
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
    missing = [name for name in kernel_names(dtype_suffix, variant, index_bits, layout)
               if f".entry {name}(" not in ptx]
    if missing:
        raise CompileError(f"kernels missing from the PTX for {arch}: {missing}")
    return log


def kernel_names(dtype_suffix: str | None = None, variant: str | None = None,
                 index_bits: int | None = None, layout: str | None = None) -> list[str]:
    """Exported kernel names, all or those of one dtype / variant / index width / layout."""
    suffixes = SUFFIXES.values() if dtype_suffix is None else [dtype_suffix]
    variants = VARIANTS if variant is None else [variant]
    widths = INDEX_BITS if index_bits is None else [index_bits]
    layouts = LAYOUTS if layout is None else [layout]
    return [f"carafe_{kernel}_{v}_i{bits}_{'nhwc_' if lay == 'nhwc' else ''}{suffix}" for lay in layouts
            for suffix in suffixes for v in variants for bits in widths for kernel in KERNELS]


_MODULES: dict[tuple[int, torch.dtype, str, int, str], dict[str, object]] = {}


def _compiled(device_index: int, dtype: torch.dtype, variant: str, bits: int, layout: str = "nchw"
              ) -> dict[str, object]:
    """The three kernels of one (device, dtype, kernel-size variant, index width, layout), compiled on first use
    (CuPy compiles for that device's architecture and caches the binary on disk)."""
    key = (device_index, dtype, variant, bits, layout)
    if key in _MODULES:
        return _MODULES[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the CARAFE CUDA kernels for {dtype}, kernel size variant {variant}, {bits}-bit indices, {layout} "
            "layout are not compiled "
            "yet, and compiling them inside CUDA graph capture would break the capture; call "
            "carafe.cuda_warmup(dtypes=..., kernel_sizes=...) (or run the model once) before capturing")
    cupy = _cupy()
    suffix = SUFFIXES[dtype]
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(), options=compile_options(suffix, variant, bits, layout))
        try:
            functions = {name: module.get_function(name) for name in kernel_names(suffix, variant, bits, layout)}
        except cupy.cuda.compiler.CompileException as err:
            raise CompileError(f"compiling {KERNEL_SOURCE} for {dtype} ({variant}, {bits}-bit indices, {layout}) on "
                               f"cuda:{device_index} failed:\n{err}") from None
    _MODULES[key] = functions
    return functions


def warmup(device: torch.device | int | str | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
           kernel_sizes: tuple[int, ...] = (1, 3, 5, 7), layouts: tuple[str, ...] = LAYOUTS) -> list[str]:
    """Compile and load the kernels for ``dtypes`` (default: all four), ``kernel_sizes`` (any other odd size
    loads the run-time-k variant) and ``layouts`` (default both, ``"nchw"`` and ``"nhwc"`` for channels_last
    features) on ``device`` (default: the current CUDA device), both index widths, so that no later call
    compiles; returns the kernel names. Needed before CUDA graph capture, where compiling is refused
    (the binaries are cached on disk by CuPy, so later processes load them quickly)."""
    dtypes = tuple(SUFFIXES) if dtypes is None else tuple(dtypes)
    for dtype in dtypes:
        if dtype not in SUFFIXES:
            raise TypeError(f"carafe.cuda_warmup: dtype must be one of {list(SUFFIXES)}, got {dtype}")
    for k in kernel_sizes:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"carafe.cuda_warmup: kernel sizes must be odd integers >= 1, got {k!r}")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"carafe.cuda_warmup: layouts must be among {LAYOUTS}, got {layout!r}")
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
                for layout in dict.fromkeys(layouts):
                    names += list(_compiled(index, dtype, variant, bits, layout))
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


def kernel_name(kernel: str, kernel_size: int, dtype: torch.dtype, index_bits: int, layout: str = "nchw") -> str:
    """The exported name of one kernel variant, e.g. ``carafe_forward_k5_i32_f32`` or, channels_last,
    ``carafe_forward_k5_i32_nhwc_f32``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tag = "nhwc_" if layout == "nhwc" else ""
    return f"carafe_{kernel}_{kernel_variant(kernel_size)}_i{index_bits}_{tag}{SUFFIXES[dtype]}"


def nhwc_lanes(dtype: torch.dtype) -> int:
    """Threads that share an output pixel in the channels_last kernels (adjacent channels, one 32-byte sector)."""
    return NHWC_LANE_BYTES // torch.empty((), dtype=dtype).element_size()


def work_items(kernel: str, geometry: tuple[int, ...], layout: str = "nchw",
               dtype: torch.dtype = torch.float32) -> int:
    """Threads a kernel needs (one per work item, as numbered in cuda/carafe_reassemble.cuh);
    geometry = (n, c, h, w, out_h, out_w, k, groups, sigma, up, slices[, masks_nhwc]); the channels_last items
    depend on the dtype (its lane count)."""
    n, c, h, w, out_h, out_w, k, groups, _, _, slices = geometry[:11]
    fixed = k in FIXED_KERNEL_SIZES
    cg = c // groups
    if layout == "nhwc":
        lanes = nhwc_lanes(dtype)
        if kernel == "forward":
            return n * out_h * out_w * groups * slices * lanes
        if kernel == "backward_features":
            return n * h * w * groups * -(-cg // (lanes * NHWC_GRAD_CHANNELS)) * lanes
        if kernel == "backward_masks":
            return n * out_h * out_w * groups * (1 if fixed else -(-(k * k) // TAPS_PER_THREAD)) * lanes
        raise ValueError(f"unknown reassembly kernel {kernel!r}; expected one of {KERNELS}")
    if kernel == "forward":
        per_group = slices if fixed else -(-cg // CHANNELS_PER_THREAD)
        return n * groups * per_group * out_h * out_w
    if kernel == "backward_features":
        return n * groups * -(-cg // GRAD_CHANNELS_PER_THREAD) * h * w
    if kernel == "backward_masks":
        return n * groups * (1 if fixed else -(-(k * k) // TAPS_PER_THREAD)) * out_h * out_w
    raise ValueError(f"unknown reassembly kernel {kernel!r}; expected one of {KERNELS}")


def forward_slices(geometry: tuple[int, ...], target_threads: int, layout: str = "nchw",
                   dtype: torch.dtype = torch.float32) -> int:
    """Channel slices per group for the forward pass (NCHW: fixed k only): 1 (every mask value read once) unless
    that leaves fewer than ``target_threads`` threads; then the smallest power of two that reaches it, at most the
    group's channel count (channels_last: its blocks of lanes x NHWC_FORWARD_CHANNELS channels)."""
    n, c, _, _, out_h, out_w, _, groups, _, _ = geometry[:10]
    pixels, cg, slices = n * groups * out_h * out_w, c // groups, 1
    if layout == "nhwc":
        lanes = nhwc_lanes(dtype)
        pixels, cg = pixels * lanes, -(-cg // (lanes * NHWC_FORWARD_CHANNELS))
    while pixels * slices < target_threads and slices * 2 <= cg:
        slices *= 2
    return slices


def index_bits(geometry: tuple[int, ...], layout: str = "nchw", dtype: torch.dtype = torch.float32) -> int:
    """32 when every tensor of the call and every kernel's work items (in ``layout``) stay within
    MAX_32BIT_COUNT, else 64."""
    n, c, h, w, out_h, out_w, k, groups = geometry[:8]
    slices = forward_slices(geometry, 0, layout, dtype) if layout == "nhwc" else 1
    counts = [n * c * h * w, n * c * out_h * out_w, n * groups * k * k * out_h * out_w,
              *(work_items(kernel, (*geometry[:10], slices), layout, dtype) for kernel in KERNELS)]
    return 32 if max(counts) <= MAX_32BIT_COUNT else 64


def launch_plan(kernel: str, geometry: tuple[int, ...], dtype: torch.dtype, target_threads: int,
                layout: str = "nchw", masks_nhwc: bool = False) -> tuple[str, tuple[int, ...], int]:
    """(kernel name, the geometry arguments with the slice count (and, channels_last, the masks' layout flag),
    work items) for one call; geometry = (n, c, h, w, out_h, out_w, k, groups, sigma, up). ``layout`` is the
    features' ("nhwc": channels_last features, outputs and output gradients), ``masks_nhwc`` whether the masks
    (and so their gradient) are channels_last; the NCHW kernels take NCHW masks only."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if masks_nhwc and layout != "nhwc":
        raise ValueError("the NCHW kernels read NCHW-contiguous masks only (masks_nhwc needs layout='nhwc')")
    fixed = geometry[6] in FIXED_KERNEL_SIZES
    if kernel == "forward" and (fixed or layout == "nhwc"):
        slices = forward_slices(geometry, target_threads, layout, dtype)
    else:
        slices = 1
    full = (*geometry, slices) + ((int(masks_nhwc),) if layout == "nhwc" else ())
    name = kernel_name(kernel, geometry[6], dtype, index_bits(geometry, layout, dtype), layout)
    return name, full, work_items(kernel, full, layout, dtype)


@functools.lru_cache(maxsize=None)
def _target_threads(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count * THREADS_PER_SM


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def tensor_layout(kernel: str, a: Tensor, b: Tensor, out: Tensor) -> tuple[str, bool]:
    """(layout, masks_nhwc) of one launch from its tensors' memory: "nhwc" when the kernel's feature-shaped tensors
    (features, output, output gradient, feature gradient) are all channels_last, "nchw" when all are
    NCHW-contiguous; the mask-shaped one (masks or their gradient) must be NCHW-contiguous, or channels_last with
    "nhwc". ``ValueError`` for any other combination."""
    features, masks = {"forward": ((a, out), b), "backward_features": ((a, out), b),
                       "backward_masks": ((a, b), out)}[kernel]
    if all(t.is_contiguous() for t in (*features, masks)):
        return "nchw", False
    if all(_channels_last(t) for t in features) and (masks.is_contiguous() or _channels_last(masks)):
        return "nhwc", not masks.is_contiguous()
    raise ValueError(f"{kernel}: the CUDA kernels take NCHW-contiguous tensors, or channels_last features / "
                     "outputs / output gradients with NCHW-contiguous or channels_last masks; got strides "
                     f"{[t.stride() for t in (a, b, out)]}")


def launch(kernel: str, a: Tensor, b: Tensor, out: Tensor, geometry: tuple[int, ...]) -> Tensor:
    """Run ``kernel`` on ``a``, ``b`` writing ``out`` (all NCHW-contiguous, or channels_last as
    ``tensor_layout`` describes: the layout picks the kernel); geometry = (n, c, h, w, out_h, out_w, k, groups,
    sigma, up)."""
    import numpy

    for name, t in (("a", a), ("b", b), ("out", out)):
        check_storage(t, f"{kernel}'s operand {name}")
    layout, masks_nhwc = tensor_layout(kernel, a, b, out)
    device = out.device.index
    name, full, items = launch_plan(kernel, geometry, out.dtype, _target_threads(device), layout, masks_nhwc)
    if items == 0:
        return out
    blocks = min(-(-items // THREADS_PER_BLOCK), _MAX_BLOCKS)
    fn = _compiled(device, out.dtype, kernel_variant(geometry[6]), index_bits(geometry, layout, out.dtype),
                   layout)[name]
    args = (*(numpy.uint64(t.data_ptr()) for t in (a, b, out)), *(numpy.int64(v) for v in full))
    with _cupy().cuda.Device(device), _cupy_stream(out.device):
        fn((blocks,), (THREADS_PER_BLOCK,), args)
    return out


def _as_channels_last(t: Tensor) -> Tensor:
    return t if _channels_last(t) else t.contiguous(memory_format=torch.channels_last)


def _as_masks(t: Tensor) -> Tensor:
    """Masks as they come when NCHW-contiguous or channels_last (the NHWC kernels read both), else contiguous."""
    return t if t.is_contiguous() or _channels_last(t) else t.contiguous()


def _run(kernel: str, a: Tensor, b: Tensor, shape: tuple, layout_of: Tensor, geometry: tuple) -> Tensor:
    """Run ``kernel``. Channels_last features: the NHWC kernels on the tensors as they are (an output gradient in
    the other layout is converted; masks are read in either layout), the result channels_last, or for the mask
    gradient in the masks' layout. Otherwise the NCHW kernels on NCHW-contiguous copies (no copy if already so),
    a result whose input was channels_last returned channels_last."""
    a, b = kernel_operand(a), kernel_operand(b)
    features = {"forward": a, "backward_features": layout_of, "backward_masks": b}[kernel]
    if is_channels_last(features):
        if kernel == "backward_masks":
            a, b = _as_channels_last(a), _as_channels_last(b)
            fmt = torch.channels_last if is_channels_last(layout_of) else torch.contiguous_format
        else:
            a, b, fmt = _as_channels_last(a), _as_masks(b), torch.channels_last
        out = torch.empty(shape, dtype=a.dtype, device=a.device, memory_format=fmt)
        return launch(kernel, a, b, out, geometry)
    a, b = a.contiguous(), b.contiguous()
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
