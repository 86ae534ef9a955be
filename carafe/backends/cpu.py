"""The fast CPU backend: ``csrc/reassemble_cpu.cpp`` compiled for this CPU, with its own analytic backward.

The library is plain C++ with a C ABI, loaded with ctypes. It is normally compiled when the package is installed,
once per instruction-set level, and the widest level this CPU runs is loaded; where none was built it is compiled
on first use into a cache (see ``carafe.build``, which also says how to pre-build it: ``python -m carafe.build``).

The kernels read and write both NCHW and channels_last tensors in place (other strides are made contiguous first);
results take the layout of the input they belong to. Threads: ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from carafe import build
from carafe.backends.function import (check_storage, is_channels_last, kernel_operand,
                                     kernel_unavailable_reason, run_kernel)
from carafe.build import BuildError, is_valid_build  # noqa: F401 -- is_valid_build: re-exported for callers

SOURCE = build.SOURCE
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_loaded: dict[str, str] = {}


def build_library() -> Path:
    """Compile this CPU's library into the cache unless a valid build is there; return its path (the prebuilt
    library of the installation, if any, is neither used nor touched: see ``library_to_load``)."""
    return build.build_library()


def library_to_load() -> tuple[Path, str]:
    """The library this process loads and where it comes from (prebuilt, cached, or compiled now)."""
    return build.library_to_load()


def loaded_library() -> dict[str, str]:
    """Which library this process loaded (``path``, ``source``: e.g. ``prebuilt avx512``); empty before the first
    call on the CPU backend."""
    return dict(_loaded)


def _open_library() -> ctypes.CDLL | BuildError:
    try:
        path, source = library_to_load()
        lib = ctypes.CDLL(str(path))
    except (BuildError, OSError) as err:
        return err if isinstance(err, BuildError) else BuildError(f"loading the compiled kernels failed: {err}")
    _loaded.update(path=str(path), source=source)
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
