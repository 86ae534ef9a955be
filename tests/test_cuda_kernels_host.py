"""The CUDA kernels' per-thread code (cuda/carafe_reassemble.cuh) run on the host against the float64 reference.

The header is plain C++ apart from a qualifier macro, so tests/cuda_host_harness.cpp compiles it with g++ and runs
every work item in turn, for every variant the GPU runs: each compiled-in kernel size (k1, k3, k5, k7) and the
run-time one (kx), 32- and 64-bit indices, several channel slicings of the fixed-k forward pass, in fp64, fp32,
fp16 and bf16 (host types that round as the GPU's conversions do, checked bit for bit against torch's). This checks
the index math, boundary handling, the interior / border paths and the gather of the feature gradient on machines
without a GPU; what it cannot check (the launch itself, the CuPy glue) is covered by the tests marked ``cuda``.
One harness build (a few seconds) serves the whole file.
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
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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
    for layout, scalars in (("nchw", 11), ("nhwc", 12)):  # every GPU kernel has its host twin
        for name in cuda_backend.kernel_names(layout=layout):
            fn = getattr(lib, f"host_{name}")
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * scalars
            fn.restype = None
    for name in ("host_round_f16", "host_round_bf16", "host_widen_f16"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    return lib


def _run(lib, name: str, a, b, out, geometry):
    getattr(lib, f"host_{name}")(a.data_ptr(), b.data_ptr(), out.data_ptr(), *geometry)
    return out


def test_work_split_matches_header():
    header = (ROOT / "cuda" / "carafe_reassemble.cuh").read_text()
    for constant, value in (("kChannelsPerThread", cuda_backend.CHANNELS_PER_THREAD),
                            ("kGradChannelsPerThread", cuda_backend.GRAD_CHANNELS_PER_THREAD),
                            ("kTapsPerThread", cuda_backend.TAPS_PER_THREAD),
                            ("kNhwcForwardChannels", cuda_backend.NHWC_FORWARD_CHANNELS),
                            ("kNhwcGradChannels", cuda_backend.NHWC_GRAD_CHANNELS),
                            ("kNhwcMaskChannels", cuda_backend.NHWC_MASK_CHANNELS)):
        assert int(re.search(rf"{constant} = (\d+);", header).group(1)) == value, constant
    assert re.search(r"nhwc_lanes\(\) \{\s*return (\d+) / ", header).group(1) == str(cuda_backend.NHWC_LANE_BYTES)


def _conversion_inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    special = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.996, 65520.0, -65520.0, 1e30, float("inf"), float("-inf"),
               2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26, 1e-40, 3.3895314e38, 1 + 2.0 ** -11,
               1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]
    bits = torch.randint(0, 2 ** 32, (20000,), generator=gen, dtype=torch.int64).to(torch.int32)
    random_floats = bits.view(torch.float32)
    scaled = torch.randn(20000, generator=gen) * torch.logspace(-9, 5, 20000)
    values = torch.cat([torch.tensor(special, dtype=torch.float32), random_floats, scaled.float()])
    return values[~torch.isnan(values)].contiguous()


@pytest.mark.parametrize("dtype,fn", [(torch.float16, "host_round_f16"), (torch.bfloat16, "host_round_bf16")],
                         ids=["f16", "bf16"])
def test_host_rounding_matches_torch(harness, dtype, fn):
    """The host types round float32 to nearest even exactly as torch (and the GPU's __float2*_rn) do."""
    values = _conversion_inputs()
    got = torch.empty(values.shape, dtype=torch.int16)
    getattr(harness, fn)(values.data_ptr(), got.data_ptr(), values.numel())
    want = values.to(dtype).view(torch.int16)
    mismatch = (got != want).nonzero().flatten()
    assert mismatch.numel() == 0, f"{dtype} rounding differs at {values[mismatch[:5]].tolist()}"
    nan = torch.tensor([float("nan")], dtype=torch.float32)
    out = torch.empty(1, dtype=torch.int16)
    getattr(harness, fn)(nan.data_ptr(), out.data_ptr(), 1)
    assert torch.isnan(out.view(dtype).float()).all()


def test_host_half_widening_is_exact(harness):
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    got = torch.empty(every.shape, dtype=torch.float32)
    harness.host_widen_f16(every.data_ptr(), got.data_ptr(), every.numel())
    want = every.view(torch.float16).float()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert same.all()


CASES = [  # n, c, h, w, k, groups, sigma: every fixed k with interior and border pixels, and run-time k = 9
    (2, 8, 5, 7, 5, 2, 2),
    (1, 12, 6, 5, 3, 4, 3),
    (1, 3, 4, 4, 1, 1, 1),
    (2, 6, 7, 3, 7, 1, 4),
    (1, 5, 10, 9, 7, 1, 2),
    (1, 20, 9, 11, 5, 1, 2),
    (1, 9, 2, 2, 9, 3, 2),
    (1, 4, 11, 12, 9, 1, 1),
]


def _variants(k: int, cg: int) -> list[tuple[str, int, int]]:
    """(kernel-size variant, index bits, forward slices) to run: the loader's variant for k with several slicings
    (including one that does not divide the group's channels) and the run-time-k path, each at both widths."""
    variants = []
    for variant in dict.fromkeys([cuda_backend.kernel_variant(k), "kx"]):
        slicings = sorted({1, min(3, cg), cg}) if variant != "kx" else [1]
        for bits in cuda_backend.INDEX_BITS:
            variants += [(variant, bits, s) for s in slicings]
    return variants


def _oracle(case: tuple[int, ...], up: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """Features, masks and an output gradient for ``case``, and the float64 reference's output and both gradients."""
    _, _, _, _, k, groups, sigma = case
    x, m, grad = reassembly_inputs(*case, up, seed=seed)
    x.requires_grad_(True)
    m.requires_grad_(True)
    ref = reassemble(x, m, k, groups, sigma, up)
    ref_gx, ref_gm = torch.autograd.grad(ref, (x, m), grad)
    return x, m, grad, ref, ref_gx, ref_gm


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}h{}w{}k{}g{}s{}".format(*c))
def test_host_kernels_match_reference(harness, case, up):
    n, c, h, w, k, groups, sigma = case
    x, m, grad, ref, ref_gx, ref_gm = _oracle(case, up, seed=sum(case) * 7 + up)
    nan = float("nan")  # every output buffer starts as NaN, so an element left unwritten fails the comparison
    for variant, bits, slices in _variants(k, c // groups):
        geometry = (n, c, h, w, *ref.shape[2:], k, groups, sigma, int(up), slices)
        for dtype in DTYPES:
            xd, md, gd = (t.detach().to(dtype).contiguous() for t in (x, m, grad))

            def name(kernel: str) -> str:
                return f"carafe_{kernel}_{variant}_i{bits}_{cuda_backend.SUFFIXES[dtype]}"

            tag = f"{variant} i{bits} slices={slices} {dtype}"
            out = _run(harness, name("forward"), xd, md, torch.full(ref.shape, nan, dtype=dtype), geometry)
            assert_matches_oracle(out, ref, dtype, f"output ({tag})")
            if slices != 1:
                continue  # slices only change the forward pass
            gx = _run(harness, name("backward_features"), gd, md, torch.full(x.shape, nan, dtype=dtype), geometry)
            gm = _run(harness, name("backward_masks"), gd, xd, torch.full(m.shape, nan, dtype=dtype), geometry)
            assert_matches_oracle(gx, ref_gx, dtype, f"grad features ({tag})")
            assert_matches_oracle(gm, ref_gm, dtype, f"grad masks ({tag})")


def test_launch_plan_picks_the_variant():
    """The loader's choice: compiled-in k where there is one, 32-bit indices below 2^30 elements, channel slices
    only to fill the device."""
    geometry = (2, 256, 128, 128, 256, 256, 5, 1, 2, 1)
    name, full, items = cuda_backend.launch_plan("forward", geometry, torch.float32, target_threads=132 * 1024)
    assert name == "carafe_forward_k5_i32_f32"
    assert full[-1] == 2 and items == 2 * 2 * 256 * 256  # 131072 pixels need two slices for 135168 threads
    name, full, _ = cuda_backend.launch_plan("forward", geometry, torch.float32, target_threads=1)
    assert full[-1] == 1
    assert cuda_backend.launch_plan("backward_masks", (1, 4, 8, 8, 16, 16, 9, 1, 2, 1), torch.float16, 1)[0] == \
        "carafe_backward_masks_kx_i32_f16"
    huge = (1, 2 ** 12, 2 ** 9, 2 ** 9, 2 ** 10, 2 ** 10, 3, 1, 2, 1)  # 2^32 output elements
    assert cuda_backend.index_bits(huge) == 64
    assert cuda_backend.launch_plan("forward", huge, torch.bfloat16, 1)[0] == "carafe_forward_k3_i64_bf16"
    assert cuda_backend.index_bits((1, 2 ** 10, 2 ** 9, 2 ** 9, 2 ** 9, 2 ** 9, 1, 1, 1, 1)) == 32  # 2^28
    # slices never exceed the group's channels
    assert cuda_backend.forward_slices((1, 6, 2, 2, 4, 4, 3, 2, 2, 1), target_threads=10 ** 9) == 2


# Channels_last: the NCHW cases, and groups with more channels than one block of lanes (a partial last block, some
# lanes without channels in it, several feature-gradient chunks, several forward blocks to deal out to slices).
NHWC_CASES = CASES + [(1, 72, 3, 4, 3, 1, 2), (1, 72, 4, 5, 5, 2, 2)]
CHANNELS_LAST = torch.channels_last


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("case", NHWC_CASES, ids=lambda c: "n{}c{}h{}w{}k{}g{}s{}".format(*c))
def test_host_nhwc_kernels_match_reference(harness, case, up):
    """The channels_last kernels (features, outputs and output gradients channels_last in memory; masks and their
    gradient channels_last or NCHW) against the float64 reference: the loader's variant for k and the run-time-k
    one, both index widths, forward slices 1 and 3, every dtype."""
    n, c, h, w, k, groups, sigma = case
    x, m, grad, ref, ref_gx, ref_gm = _oracle(case, up, seed=sum(case) * 5 + up)
    nan = float("nan")
    runs = [(variant, bits, slices, masks_nhwc)
            for variant in dict.fromkeys([cuda_backend.kernel_variant(k), "kx"]) for bits in cuda_backend.INDEX_BITS
            for slices, masks_nhwc in ((1, 1), (3, 0), (1, 0))]
    for variant, bits, slices, masks_nhwc in runs:
        geometry = (n, c, h, w, *ref.shape[2:], k, groups, sigma, int(up), slices, masks_nhwc)
        mask_format = CHANNELS_LAST if masks_nhwc else torch.contiguous_format
        for dtype in DTYPES:
            xd, gd = (t.detach().to(dtype).contiguous(memory_format=CHANNELS_LAST) for t in (x, grad))
            md = m.detach().to(dtype).contiguous(memory_format=mask_format)

            def name(kernel: str) -> str:
                return f"carafe_{kernel}_{variant}_i{bits}_nhwc_{cuda_backend.SUFFIXES[dtype]}"

            def empty(shape, memory_format=CHANNELS_LAST):
                return torch.full(shape, nan, dtype=dtype).contiguous(memory_format=memory_format)

            tag = f"nhwc {variant} i{bits} slices={slices} masks_nhwc={masks_nhwc} {dtype}"
            out = _run(harness, name("forward"), xd, md, empty(ref.shape), geometry)
            assert_matches_oracle(out, ref, dtype, f"output ({tag})")
            if slices != 1:
                continue  # slices only change the forward pass
            gx = _run(harness, name("backward_features"), gd, md, empty(x.shape), geometry)
            gm = _run(harness, name("backward_masks"), gd, xd, empty(m.shape, mask_format), geometry)
            assert_matches_oracle(gx, ref_gx, dtype, f"grad features ({tag})")
            assert_matches_oracle(gm, ref_gm, dtype, f"grad masks ({tag})")


def test_launch_plan_picks_the_nhwc_variant():
    """Channels_last calls: the _nhwc_ kernel of the same variant, the masks' layout as the last argument, one
    thread per lane of 32 bytes of channels (8 fp32 / 16 fp16 channels of a pixel)."""
    geometry = (2, 256, 128, 128, 256, 256, 5, 1, 2, 1)
    name, full, items = cuda_backend.launch_plan("forward", geometry, torch.float32, 132 * 1024, "nhwc", True)
    assert name == "carafe_forward_k5_i32_nhwc_f32" and full[-2:] == (1, 1) and items == 2 * 256 * 256 * 8
    name, full, items = cuda_backend.launch_plan("backward_masks", geometry, torch.float16, 1, "nhwc", False)
    assert name == "carafe_backward_masks_k5_i32_nhwc_f16" and full[-1] == 0 and items == 2 * 256 * 256 * 16
    name, _, items = cuda_backend.launch_plan("backward_features", geometry, torch.float32, 1, "nhwc")
    assert name == "carafe_backward_features_k5_i32_nhwc_f32" and items == 2 * 128 * 128 * 4 * 8  # 4 chunks of 64
    # a small map: the forward deals a group's blocks of 32 fp32 channels out to slices to fill the device
    small = (1, 256, 4, 4, 8, 8, 5, 1, 2, 1)
    assert cuda_backend.launch_plan("forward", small, torch.float32, 10 ** 6, "nhwc")[1][-2] == 8
    assert cuda_backend.launch_plan("backward_masks", (1, 4, 8, 8, 16, 16, 9, 1, 2, 1), torch.float64, 1,
                                    "nhwc")[0] == "carafe_backward_masks_kx_i32_nhwc_f64"
    with pytest.raises(ValueError, match="NCHW-contiguous masks only"):
        cuda_backend.launch_plan("forward", geometry, torch.float32, 1, "nchw", True)
    with pytest.raises(ValueError, match="layout must be one of"):
        cuda_backend.launch_plan("forward", geometry, torch.float32, 1, "nwhc")


def test_layout_of_a_launch_comes_from_the_tensors():
    x, m, grad = reassembly_inputs(1, 4, 5, 6, 3, 2, 2, True)
    cl = torch.channels_last
    xl, ml, gl = (t.contiguous(memory_format=cl) for t in (x, m, grad))
    assert cuda_backend.tensor_layout("forward", x, m, grad) == ("nchw", False)
    assert cuda_backend.tensor_layout("forward", xl, ml, gl) == ("nhwc", True)
    assert cuda_backend.tensor_layout("forward", xl, m, gl) == ("nhwc", False)
    assert cuda_backend.tensor_layout("backward_features", gl, m, xl) == ("nhwc", False)
    assert cuda_backend.tensor_layout("backward_masks", gl, xl, ml) == ("nhwc", True)
    with pytest.raises(ValueError, match="channels_last features"):
        cuda_backend.tensor_layout("forward", xl, m, grad)  # a channels_last input with an NCHW output
    with pytest.raises(ValueError, match="channels_last features"):
        cuda_backend.tensor_layout("forward", x, ml, grad)  # the NCHW kernels read NCHW masks only


@pytest.mark.parametrize("kernel", ["forward", "backward_features", "backward_masks"])
def test_channels_last_operands_reach_the_kernel_untransposed(monkeypatch, kernel):
    """The backend hands channels_last features (and masks, in either layout) to the kernel as they are; only an
    output gradient in the other layout is converted; results take their input's layout. (The launch itself is
    replaced: this runs without a GPU.)"""
    x, m, grad = reassembly_inputs(1, 4, 5, 6, 3, 2, 2, True)
    cl = torch.channels_last
    seen = {}

    def fake_launch(name, a, b, out, geometry):  # noqa: ANN001, ANN202
        seen.update(a=a, b=b, out=out, layout=cuda_backend.tensor_layout(name, a, b, out))
        return out

    monkeypatch.setattr(cuda_backend, "launch", fake_launch)
    geometry = (1, 4, 5, 6, 10, 12, 3, 2, 2, 1)
    for masks in (m.contiguous(memory_format=cl), m):
        xl, gl = x.contiguous(memory_format=cl), grad.contiguous(memory_format=cl)
        a, b, shape, layout_of = {"forward": (xl, masks, grad.shape, xl),
                                  "backward_features": (grad, masks, x.shape, xl),  # an NCHW output gradient
                                  "backward_masks": (gl, xl, m.shape, masks)}[kernel]
        out = cuda_backend._run(kernel, a, b, shape, layout_of, geometry)
        assert seen["layout"] == ("nhwc", masks.stride(1) == 1)
        assert seen["out"] is out and tuple(out.shape) == tuple(shape)
        untouched = {"forward": (a, b), "backward_features": (b,), "backward_masks": (a, b)}[kernel]
        for t, name in zip(untouched, ("a", "b") if kernel != "backward_features" else ("b",)):
            assert seen[name].data_ptr() == t.data_ptr(), f"{name} was copied"
        if kernel == "backward_features":
            assert seen["a"].is_contiguous(memory_format=cl)  # converted once
        want_cl = kernel != "backward_masks" or masks.stride(1) == 1
        assert out.is_contiguous(memory_format=cl) == want_cl and out.is_contiguous() == (not want_cl)
    # NCHW features: the NCHW kernels, on contiguous operands
    a, b = {"forward": (x, m), "backward_features": (grad, m), "backward_masks": (grad, x)}[kernel]
    cuda_backend._run(kernel, a, b, {"forward": grad.shape, "backward_features": x.shape,
                                     "backward_masks": m.shape}[kernel], {"forward": x, "backward_features": x,
                                                                          "backward_masks": m}[kernel], geometry)
    assert seen["layout"] == ("nchw", False)
