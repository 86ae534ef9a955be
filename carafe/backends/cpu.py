"""The fast CPU backend: ``csrc/reassemble_cpu.cpp`` compiled on first use, with its own analytic backward.

The library is plain C++ with a C ABI (no libtorch headers), so building it takes a couple of seconds; it is cached
under ``$CARAFE_BUILD_DIR`` (default ``~/.cache/carafe``) in a file whose name hashes the source, the compiler and
its flags and this CPU's instruction-set flags, so an edit or a different machine triggers a fresh build. The build
writes to a temporary file and renames it, so concurrent processes (DDP workers, pytest-xdist) are safe.

The kernels read and write both NCHW and channels_last tensors in place (other strides are made contiguous first);
results take the layout of the input they belong to. Threads: ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from carafe.backends.function import is_channels_last, reassemble_function

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "reassemble_cpu.cpp"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class BuildError(RuntimeError):
    pass


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX to a C++17 compiler)")
    return cxx


def build_library() -> Path:
    """Compile the kernels if no up-to-date build is cached; return the shared library's path."""
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *CXX_FLAGS, _cpu_flags()]).encode())
    build_dir = Path(os.environ.get("CARAFE_BUILD_DIR", Path.home() / ".cache" / "carafe"))
    target = build_dir / f"reassemble_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *CXX_FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"compiling {SOURCE} failed:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _open_library() -> ctypes.CDLL | BuildError:
    try:
        lib = ctypes.CDLL(str(build_library()))
    except (BuildError, OSError) as err:
        return err if isinstance(err, BuildError) else BuildError(f"loading the compiled kernels failed: {err}")
    for suffix in _SUFFIX.values():
        for name in ("forward", "backward_features", "backward_masks"):
            fn = getattr(lib, f"carafe_{name}_{suffix}")
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 9 + [ctypes.c_int] * 5
            fn.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _library_or_error() -> ctypes.CDLL | BuildError:
    # A failed build is remembered too, so a missing compiler costs one attempt per process, not one per call.
    return _open_library()


def _library() -> ctypes.CDLL:
    lib = _library_or_error()
    if isinstance(lib, BuildError):
        raise lib
    return lib


def _dense(t: Tensor) -> tuple[Tensor, bool]:
    """``t`` in a layout the kernels read, and whether that layout is channels-first (NCHW) or channels-last."""
    if t.is_contiguous():
        return t, True
    if t.is_contiguous(memory_format=torch.channels_last):
        return t, False
    return t.contiguous(), True


def _run(kernel: str, a: Tensor, b: Tensor, shape: tuple, layout_of: Tensor, geometry: tuple) -> Tensor:
    """Run ``kernel`` on a, b into a new tensor of ``shape`` laid out like ``layout_of``; the kernels read each
    tensor's layout (NCHW or channels_last) from a flag, so nothing is transposed here."""
    out_channels_first = not is_channels_last(layout_of)
    memory_format = torch.contiguous_format if out_channels_first else torch.channels_last
    out = torch.empty(shape, dtype=a.dtype, memory_format=memory_format)
    (a, a_cf), (b, b_cf) = _dense(a), _dense(b)
    fn = getattr(_library(), f"carafe_{kernel}_{_SUFFIX[out.dtype]}")
    fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), *geometry, a_cf, b_cf, out_channels_first,
       torch.get_num_threads())
    return out


_Reassemble = reassemble_function(_run)


class CPUBackend:
    def unavailable_reason(self, features: Tensor) -> str | None:
        if features.device.type != "cpu":
            return f"it runs on CPU tensors only, got a tensor on {features.device}; move it with .cpu()"
        if features.dtype not in _SUFFIX:
            return (f"it supports float32 and float64, got {features.dtype}; convert with .float(), or use the "
                    "'reference' backend")
        try:
            _library()
        except BuildError as err:
            return str(err)
        return None

    def reassemble(self, features, masks, kernel_size, group_size, scale_factor, up):
        return _Reassemble.apply(features, masks, kernel_size, group_size, scale_factor, up)


BACKEND = CPUBackend()
