"""Which implementation of the reassembly runs, and the one way to force it.

Backends:
    ``reference``  pure PyTorch, autograd backward; any device and dtype. The oracle of the tests.
    ``cpu``        compiled C++ (built on first use) with an analytic backward; CPU tensors, float32 / float64.
    ``cuda``       CUDA kernels from ``cuda/`` compiled through CuPy; CUDA tensors (fp16, bf16, fp32, fp64).

By default the backend is chosen per call from the tensors' device and dtype (``auto``): ``cuda`` for CUDA tensors,
``cpu`` for float32 / float64 CPU tensors, ``reference`` for the rest. To force one, and only that way::

    with carafe.use_backend("reference"):
        out = carafe.carafe(x, masks, 5, 1, 2)

A forced backend that cannot run the call raises ``BackendUnavailableError`` saying why and how to fix it.
In ``auto`` mode, if the fast backend for a device cannot be used at all (no C++ compiler, CuPy missing), the call
runs on ``reference`` and a ``RuntimeWarning`` saying why is issued once, so the slowdown is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
import warnings
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from carafe._caller import caller_stacklevel
from carafe.backends.function import storage_problem

_MODULES = {"reference": "carafe.backends.reference", "cpu": "carafe.backends.cpu", "cuda": "carafe.backends.cuda"}
BACKENDS = tuple(_MODULES)

_forced: contextvars.ContextVar[str] = contextvars.ContextVar("carafe_backend", default="auto")
_warned: set[str] = set()
_used: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run on this machine or for these tensors."""


class Backend(Protocol):
    def unavailable_reason(self, features: Tensor) -> str | None:
        """None if this backend can run on ``features``' device and dtype, else why not and how to fix it."""

    def compute(self, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None, kernel_size: int,
                group_size: int, scale_factor: int, up: bool) -> Tensor:
        """One of the op's three kernels on validated inputs: ``forward`` (the reassembly of ``features`` with
        ``masks``), ``backward_features`` or ``backward_masks`` (the gradient of a loss w.r.t. that input, given its
        gradient ``grad_out`` w.r.t. the output). ``up`` selects CARAFE (True) or CARAFE++ downsampling (False)."""


def _load(name: str) -> Backend:
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name != _MODULES[name]:
            raise
        raise BackendUnavailableError(
            f"the {name!r} backend is not part of this installation ({_MODULES[name]} is missing)") from None
    return module.BACKEND


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every carafe/carafe_down call inside the block to use backend ``name`` (or ``"auto"``)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown CARAFE backend {name!r}; choose one of 'auto', " + ", ".join(map(repr, BACKENDS)))
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str:
    """The name set by the innermost ``use_backend`` block, or ``"auto"``."""
    return _forced.get()


def _auto_name(features: Tensor) -> str:
    if storage_problem(features) is not None:
        return "reference"  # a traced call (fake / meta / functional tensors): no compiled kernel may run on it
    if features.device.type == "cuda":
        return "cuda"
    if features.device.type == "cpu" and features.dtype in (torch.float32, torch.float64):
        return "cpu"
    return "reference"


def select(features: Tensor) -> Backend:
    """The backend that runs a call on ``features`` under the current setting."""
    forced = _forced.get()
    name = _auto_name(features) if forced == "auto" else forced
    try:
        backend = _load(name)
        reason = backend.unavailable_reason(features)
    except BackendUnavailableError as err:
        reason = str(err)
    if reason is None:
        _used.add(name)
        return backend
    if forced != "auto":
        raise BackendUnavailableError(f"CARAFE backend {name!r} cannot run this call: {reason}")
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"CARAFE: the fast {name!r} backend is unavailable ({reason}); using the slow 'reference' "
                      "backend instead", RuntimeWarning, stacklevel=caller_stacklevel())
    _used.add("reference")
    return _load("reference")


def backends_used() -> list[str]:
    """The backends that have run a reassembly in this process so far (sorted), e.g. for a run's record."""
    return sorted(_used)


def usage() -> dict[str, object]:
    """For a run's record: ``used``, the backends that ran the reassembly in this process (empty if no CARAFE
    operator ran), and ``cpu_library``, where the CPU backend's kernels came from (e.g. ``prebuilt avx512``)."""
    record: dict[str, object] = {"used": backends_used()}
    cpu = sys.modules.get("carafe.backends.cpu")
    if cpu is not None and cpu.loaded_library():
        record["cpu_library"] = cpu.loaded_library()["source"]
    return record
