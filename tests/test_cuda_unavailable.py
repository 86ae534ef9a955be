"""What the CUDA backend says where it cannot run (these run on any machine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import carafe
from carafe.backends import cuda as cuda_backend


def test_cpu_tensor_forced_onto_cuda_says_why():
    x = torch.randn(1, 4, 3, 3)
    m = torch.randn(1, 9, 6, 6)
    expected = r"CUDA tensors only.*\.cuda\(\)"
    with carafe.use_backend("cuda"), pytest.raises(carafe.BackendUnavailableError, match=expected):
        carafe.carafe(x, m, 3, 1, 2)


def test_missing_cupy_says_how_to_install(monkeypatch):
    def no_cupy():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(cuda_backend, "_cupy", no_cupy)
    fake_cuda_tensor = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    reason = cuda_backend.BACKEND.unavailable_reason(fake_cuda_tensor)
    assert reason is not None and "CuPy is not installed" in reason and "cupy-cuda13x" in reason


def test_unsupported_dtype(monkeypatch):
    fake_cuda_tensor = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float8_e4m3fn)
    assert "float16, bfloat16, float32 and float64" in cuda_backend.BACKEND.unavailable_reason(fake_cuda_tensor)


def test_no_gpu_is_reported():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the message on machines without one")
    fake_cuda_tensor = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float32)
    reason = cuda_backend.BACKEND.unavailable_reason(fake_cuda_tensor)
    assert reason is not None and ("GPU" in reason or "device" in reason), reason
