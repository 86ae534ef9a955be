"""Shared by the operator tests: the float64 brute-force oracle, input factories, tolerances per dtype, the
(backend, device) pairs and dtypes every test runs over, and the skip of GPU tests on machines without a GPU.

Tests import these names with ``from conftest import ...`` (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

CUDA_SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped, with the reason, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# --- what the operator tests run over ------------------------------------------------------------------------------

def on_cuda(*values: object, id: str | None = None) -> pytest.param:  # noqa: A002 -- pytest.param's name
    """A parameter set that needs a GPU (marked ``cuda``)."""
    return pytest.param(*values, marks=pytest.mark.cuda, id=id)


DEVICES = ["cpu", on_cuda("cuda")]
# Every backend on the device it is written for, and the reference (any device) on both.
BACKEND_DEVICES = [pytest.param("reference", "cpu", id="reference-cpu"), pytest.param("cpu", "cpu", id="cpu-cpu"),
                   on_cuda("reference", "cuda", id="reference-cuda"), on_cuda("cuda", "cuda", id="cuda-cuda")]
BACKEND_DTYPES = {"reference": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
                  "cpu": (torch.float64, torch.float32),
                  "cuda": (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
BACKEND_DEVICE_DTYPES = [
    pytest.param(backend, device, dtype, marks=param.marks, id=f"{param.id}-{str(dtype).split('.')[-1]}")
    for param in BACKEND_DEVICES for backend, device in [param.values] for dtype in BACKEND_DTYPES[backend]]

# A result computed in a dtype is compared with the float64 oracle to within this: element-wise (relative and
# absolute) for float32 / float64, and as the relative error of the whole tensor for every dtype (half precision
# rounds single elements too coarsely for an element-wise bound).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_matches_oracle(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` (computed in ``dtype``) against the float64 ``want`` to within ``TOLERANCE[dtype]``."""
    tolerance = TOLERANCE[dtype]
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite elements (left unwritten?)"
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=lambda e: f"{what}: {e}")
    relative = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert relative < tolerance, f"{what}: relative error {relative:.3g} >= {tolerance}"


# --- inputs and the oracle -----------------------------------------------------------------------------------------

def out_size(h: int, w: int, scale: int, up: bool) -> tuple[int, int]:
    """The output (H, W) of the reassembly of an (h, w) map: times ``scale`` up, ceil-divided down."""
    return (h * scale, w * scale) if up else (math.ceil(h / scale), math.ceil(w / scale))


def reassembly_inputs(n: int, c: int, h: int, w: int, k: int, groups: int, scale: int, up: bool,
                      dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0,
                      softmax: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Features Tensor[n, c, h, w], masks Tensor[n, groups * k^2, out_h, out_w] (softmax-normalised per group if
    ``softmax``) and an output gradient Tensor[n, c, out_h, out_w], drawn in float64 on the CPU from ``seed`` and
    then cast and moved, so every device and dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = out_size(h, w, scale, up)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    m = torch.randn(n, groups * k * k, out_h, out_w, generator=gen, dtype=torch.float64)
    if softmax:
        m = torch.softmax(m.view(n, groups, k * k, out_h, out_w), dim=2).view_as(m)
    grad = torch.randn(n, c, out_h, out_w, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, m, grad))


def brute_force(x: np.ndarray, m: np.ndarray, k: int, groups: int, scale: int, up: bool) -> np.ndarray:
    """The reassembly formula written as plain loops, in float64 (the oracle of every backend)."""
    n, c, h, w = x.shape
    out_h, out_w = m.shape[2:]
    r = k // 2
    out = np.zeros((n, c, out_h, out_w))
    for b, ch, p, q in itertools.product(range(n), range(c), range(out_h), range(out_w)):
        g = ch // (c // groups)
        cy, cx = (p // scale, q // scale) if up else (p * scale, q * scale)
        total = 0.0
        for ky, kx in itertools.product(range(k), range(k)):
            iy, ix = cy + ky - r, cx + kx - r
            if 0 <= iy < h and 0 <= ix < w:
                total += x[b, ch, iy, ix] * m[b, g * k * k + ky * k + kx, p, q]
        out[b, ch, p, q] = total
    return out
