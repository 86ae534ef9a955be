"""The fast CPU backend: ``csrc/reassemble_cpu.cpp`` compiled on first use, with its own analytic backward.

The library is plain C++ with a C ABI (no libtorch headers), so building it takes a couple of seconds; it is cached
under ``$CARAFE_BUILD_DIR`` (default ``~/.cache/carafe``) in a file whose name hashes the source, the compiler and
its flags and this CPU's instruction-set flags, so an edit or a different machine triggers a fresh build. Beside it
lies the library's SHA-256, recorded at build time; a cached library that does not match it is rebuilt, not loaded.

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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from carafe.backends.function import (check_storage, is_channels_last, kernel_operand,
                                     kernel_unavailable_reason, run_kernel)

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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest_path(library: Path) -> Path:
    """Where the SHA-256 of ``library``, recorded when it was built, is kept."""
    return library.with_name(library.name + ".sha256")


def is_valid_build(library: Path) -> bool:
    """True if ``library`` exists and its bytes hash to the digest recorded at build time (a truncated or otherwise
    damaged file would crash the process when called, so it is rebuilt instead of loaded)."""
    try:
        return _digest_path(library).read_text().strip() == _file_digest(library)
    except OSError:
        return False


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _remove_stale_temp_files(build_dir: Path) -> None:
    """Delete the temporary files of builds whose process is gone (killed mid-build); live builds keep theirs."""
    for tmp in build_dir.glob(".reassemble_cpu-*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(b"")  # fails here, with the folder named, if the cache is not writable
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _compile(cxx: str, output: Path) -> None:
    result = subprocess.run([cxx, *CXX_FLAGS, str(SOURCE), "-o", str(output)], capture_output=True, text=True)
    if result.returncode != 0:
        log = result.stderr.strip() or result.stdout.strip() or "(the compiler printed nothing)"
        raise BuildError(f"the C++ compiler {cxx!r} failed on {SOURCE} with exit status {result.returncode}: {log}\n"
                         "Set CXX to a working C++17 compiler (for example CXX=g++) or install g++.")


def build_library() -> Path:
    """Compile the kernels unless a valid build is cached; return the shared library's path.

    The library and its recorded SHA-256 are each written to a temporary file and renamed, so concurrent builds
    (DDP workers, pytest-xdist) are safe and a killed build leaves no half-written library under the final name.
    """
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *CXX_FLAGS, _cpu_flags()]).encode())
    build_dir = Path(os.environ.get("CARAFE_BUILD_DIR", Path.home() / ".cache" / "carafe"))
    target = build_dir / f"reassemble_cpu-{key.hexdigest()[:16]}.so"
    if is_valid_build(target):
        return target
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(build_dir)
        _write_atomically(target, lambda tmp: _compile(cxx, tmp))
        _write_atomically(_digest_path(target), lambda tmp: tmp.write_text(_file_digest(target) + "\n"))
    except OSError as err:
        raise BuildError(f"writing the compiled kernels to {build_dir} failed ({err}); set CARAFE_BUILD_DIR to a "
                         "writable folder") from None
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
    check_storage(a, f"the first operand of {kernel}")
    check_storage(b, f"the second operand of {kernel}")
    out = torch.empty(shape, dtype=a.dtype, memory_format=memory_format)
    (a, a_cf), (b, b_cf) = _dense(kernel_operand(a)), _dense(kernel_operand(b))
    fn = getattr(_library(), f"carafe_{kernel}_{_SUFFIX[out.dtype]}")
    fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), *geometry, a_cf, b_cf, out_channels_first,
       torch.get_num_threads())
    return out


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
        return kernel_unavailable_reason(features)

    def compute(self, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None, kernel_size: int,
                group_size: int, scale_factor: int, up: bool) -> Tensor:
        return run_kernel(_run, kernel, features, masks, grad_out, kernel_size, group_size, scale_factor, up)


BACKEND = CPUBackend()
