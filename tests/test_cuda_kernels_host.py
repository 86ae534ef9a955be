"""The CUDA kernels' per-thread code (cuda/carafe_reassemble.cuh) run on the host against the reference.

The header is plain C++ apart from a qualifier macro, so tests/cuda_host_harness.cpp compiles it with g++ and runs
every work item in turn. This checks the index math, boundary handling and the gather of the feature gradient on
machines without a GPU; what it cannot check (launch configuration, fp16/bf16, the CuPy glue) is covered by
tests/test_cuda_backend.py on a GPU.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from carafe.backends import cuda as cuda_backend
from carafe.backends.reference import reassemble
from conftest import assert_matches_oracle, reassembly_inputs

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_host_harness.cpp"
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> ctypes.CDLL:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not on PATH; the host build of the CUDA kernels' code needs a C++17 compiler")
    library = tmp_path_factory.mktemp("cuda_host") / "harness.so"
    flags = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-shared", "-fPIC"]
    result = subprocess.run([cxx, *flags, "-I", str(ROOT / "cuda"), str(HARNESS), "-o", str(library)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    for suffix in SUFFIX.values():
        for kernel in cuda_backend.KERNELS:
            fn = getattr(lib, f"host_{kernel}_{suffix}")
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 10
            fn.restype = None
    return lib


def _run(lib, kernel: str, a, b, out, geometry):
    getattr(lib, f"host_{kernel}_{SUFFIX[out.dtype]}")(a.data_ptr(), b.data_ptr(), out.data_ptr(), *geometry)
    return out


def test_work_split_matches_header():
    header = (ROOT / "cuda" / "carafe_reassemble.cuh").read_text()
    assert int(re.search(r"kChannelsPerThread = (\d+);", header).group(1)) == cuda_backend.CHANNELS_PER_THREAD
    assert int(re.search(r"kTapsPerThread = (\d+);", header).group(1)) == cuda_backend.TAPS_PER_THREAD


CASES = [  # n, c, h, w, k, groups, sigma
    (2, 8, 5, 7, 5, 2, 2),
    (1, 12, 6, 5, 3, 4, 3),
    (1, 3, 4, 4, 1, 1, 1),
    (2, 6, 7, 3, 7, 1, 4),
    (1, 20, 3, 9, 5, 1, 2),
    (1, 9, 2, 2, 9, 3, 2),
]


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}h{}w{}k{}g{}s{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_kernels_match_reference(harness, case, up, dtype):
    n, c, h, w, k, groups, sigma = case
    x, m, grad = reassembly_inputs(*case, up, seed=hash(case) % 2**31)
    x.requires_grad_(True)
    m.requires_grad_(True)
    ref = reassemble(x, m, k, groups, sigma, up)
    ref_gx, ref_gm = torch.autograd.grad(ref, (x, m), grad)
    geometry = (n, c, h, w, *ref.shape[2:], k, groups, sigma, int(up))
    xd, md, gd = (t.detach().to(dtype).contiguous() for t in (x, m, grad))
    nan = float("nan")  # every output buffer starts as NaN, so an element left unwritten fails the comparison
    out = _run(harness, "forward", xd, md, torch.full(ref.shape, nan, dtype=dtype), geometry)
    gx = _run(harness, "backward_features", gd, md, torch.full(x.shape, nan, dtype=dtype), geometry)
    gm = _run(harness, "backward_masks", gd, xd, torch.full(m.shape, nan, dtype=dtype), geometry)
    for name, got, want in (("output", out, ref), ("grad features", gx, ref_gx), ("grad masks", gm, ref_gm)):
        assert_matches_oracle(got, want, dtype, name)
