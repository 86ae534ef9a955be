"""carafe / carafe_down: every backend against a brute-force loop oracle and the reference, gradients, validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import carafe
from carafe import BackendUnavailableError, carafe_down, use_backend
from carafe.naive import carafe_down_unfold, carafe_unfold

OPS = {"up": carafe.carafe, "down": carafe_down}
CPU_BACKENDS = ["reference", "cpu"]


def out_size(h: int, w: int, scale: int, direction: str) -> tuple[int, int]:
    return (h * scale, w * scale) if direction == "up" else (math.ceil(h / scale), math.ceil(w / scale))


def brute_force(x: np.ndarray, m: np.ndarray, k: int, groups: int, scale: int, direction: str) -> np.ndarray:
    """The formula of DESIGN.md written as plain loops, in float64."""
    n, c, h, w = x.shape
    out_h, out_w = m.shape[2:]
    r = k // 2
    out = np.zeros((n, c, out_h, out_w))
    for b, ch, p, q in itertools.product(range(n), range(c), range(out_h), range(out_w)):
        g = ch // (c // groups)
        cy, cx = (p // scale, q // scale) if direction == "up" else (p * scale, q * scale)
        total = 0.0
        for ky, kx in itertools.product(range(k), range(k)):
            iy, ix = cy + ky - r, cx + kx - r
            if 0 <= iy < h and 0 <= ix < w:
                total += x[b, ch, iy, ix] * m[b, g * k * k + ky * k + kx, p, q]
        out[b, ch, p, q] = total
    return out


def random_inputs(n, c, h, w, k, groups, scale, direction, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = out_size(h, w, scale, direction)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    m = torch.randn(n, groups * k * k, out_h, out_w, generator=gen, dtype=dtype)
    return x, m


def run(backend, direction, x, m, k, g, s):
    with use_backend(backend):
        return OPS[direction](x, m, k, g, s)


def run_with_grads(backend, direction, x, m, k, g, s, grad_out=None):
    x = x.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_()
    out = run(backend, direction, x, m, k, g, s)
    if grad_out is None:
        # Drawn in float64 and cast, so runs in different dtypes get the same gradient.
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grad_out = grad_out.to(out.dtype)
    out.backward(grad_out)
    return out.detach(), x.grad, m.grad


# --- the oracle ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["naive"])
@pytest.mark.parametrize("k,g,s,h,w", [(3, 1, 2, 3, 4), (5, 2, 2, 4, 3), (1, 1, 3, 2, 2), (3, 2, 3, 5, 4),
                                       (7, 1, 1, 3, 5), (5, 4, 4, 2, 3)])
def test_matches_brute_force(direction, backend, k, g, s, h, w):
    x, m = random_inputs(2, 4, h, w, k, g, s, direction)
    expected = brute_force(x.numpy(), m.numpy(), k, g, s, direction)
    if backend == "naive":
        got = (carafe_unfold if direction == "up" else carafe_down_unfold)(x, m, k, g, s)
    else:
        got = run(backend, direction, x, m, k, g, s)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_brute_force_oracle_on_a_hand_computed_case():
    # 1x1 image, k = 3, up by 2: only the centre tap sees the pixel, so out = x * centre weight at every output.
    x = np.full((1, 1, 1, 1), 3.0)
    m = np.arange(9 * 4, dtype=float).reshape(1, 9, 2, 2)
    np.testing.assert_array_equal(brute_force(x, m, 3, 1, 2, "up"), 3.0 * m[:, 4:5])
    # Down by 2 on a 3x3 ramp with all-ones kernels: output (0, 0) sums the 2x2 top-left block (others are padding).
    ramp = np.arange(9, dtype=float).reshape(1, 1, 3, 3)
    ones = np.ones((1, 9, 2, 2))
    # Centres (0, 0), (0, 2), (2, 0), (2, 2); each window keeps its 2x2 part inside the image.
    np.testing.assert_array_equal(brute_force(ramp, ones, 3, 1, 2, "down")[0, 0],
                                  [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])


# --- every backend agrees with the reference ---------------------------------------------------------------------

GRID = list(itertools.product([1, 3, 5, 7], [1, 2, 4], [1, 2, 3, 4], [(5, 6), (6, 5)]))


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("k,g,s,hw", GRID, ids=[f"k{k}-g{g}-s{s}-{h}x{w}" for k, g, s, (h, w) in GRID])
def test_cpu_backend_matches_reference(direction, k, g, s, hw):
    x, m = random_inputs(2, 8, *hw, k, g, s, direction, dtype=torch.float32)
    ref = run_with_grads("reference", direction, x.double(), m.double(), k, g, s)
    got = run_with_grads("cpu", direction, x, m, k, g, s)  # the same seeded grad_out as the reference run
    for name, a, b in zip(("output", "grad features", "grad masks"), got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda e: f"{name}: {e}")


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,g,s,h,w", [(3, 2, 2, 3, 4), (5, 1, 3, 2, 3), (1, 1, 2, 3, 3)])
def test_gradcheck(direction, backend, k, g, s, h, w):
    x, m = random_inputs(2, 4, h, w, k, g, s, direction)
    x.requires_grad_()
    m.requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: OPS[direction](a, b, k, g, s), (x, m), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_requested_gradients(direction, backend):
    x, m = random_inputs(1, 4, 3, 3, 3, 1, 2, direction)
    for need_x, need_m in [(True, False), (False, True)]:
        xx, mm = x.clone().requires_grad_(need_x), m.clone().requires_grad_(need_m)
        run(backend, direction, xx, mm, 3, 1, 2).sum().backward()
        assert (xx.grad is not None) == need_x and (mm.grad is not None) == need_m


# --- layouts, sizes, threads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_channels_last_inputs(direction, backend):
    x, m = random_inputs(2, 6, 5, 7, 3, 2, 2, direction)
    expected = run_with_grads(backend, direction, x, m, 3, 2, 2)
    variants = {
        "channels_last": (x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)),
        "transposed views": (x.transpose(2, 3).contiguous().transpose(2, 3),
                             m.transpose(2, 3).contiguous().transpose(2, 3)),
        "strided slices": (torch.stack([x, x], 2).flatten(1, 2)[:, ::2], torch.nn.functional.pad(m, (0, 1))[..., :-1]),
        "mixed layouts": (x.to(memory_format=torch.channels_last), m),
    }
    for name, (xv, mv) in variants.items():
        assert torch.equal(xv, x) and torch.equal(mv, m)
        got = run_with_grads(backend, direction, xv, mv, 3, 2, 2)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda e: f"{name}: {e}")


def test_cpu_backend_keeps_channels_last():
    x, m = random_inputs(1, 4, 3, 3, 3, 1, 2, "up")
    out = run("cpu", "up", x.to(memory_format=torch.channels_last), m, 3, 1, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert run("cpu", "up", x, m, 3, 1, 2).is_contiguous()


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,h,w", [(0, 4, 4), (2, 1, 1), (1, 1, 6), (1, 5, 1)])
def test_empty_batch_and_single_pixel_maps(direction, backend, n, h, w):
    x, m = random_inputs(n, 4, h, w, 3, 2, 3, direction)
    out, gx, gm = run_with_grads(backend, direction, x, m, 3, 2, 3)
    assert out.shape == (n, 4, *out_size(h, w, 3, direction))
    assert gx.shape == x.shape and gm.shape == m.shape
    if n:
        expected = brute_force(x.numpy(), m.numpy(), 3, 2, 3, direction)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_cpu_backend_is_independent_of_thread_count():
    x, m = random_inputs(3, 16, 9, 7, 5, 2, 2, "up", dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            results.append(run_with_grads("cpu", "up", x, m, 5, 2, 2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- backend selection -------------------------------------------------------------------------------------------

def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown CARAFE backend 'fastest'"):
        with use_backend("fastest"):
            pass


def test_forcing_an_unusable_backend_says_why():
    x, m = random_inputs(1, 4, 3, 3, 3, 1, 2, "up")
    with pytest.raises(BackendUnavailableError, match="'cuda'.*cannot run"):
        run("cuda", "up", x, m, 3, 1, 2)
    with pytest.raises(BackendUnavailableError, match="float32 and float64, got torch.float16"):
        run("cpu", "up", x.half(), m.half(), 3, 1, 2)


def test_auto_runs_half_precision_on_the_reference():
    x, m = random_inputs(1, 4, 3, 3, 3, 1, 2, "up")
    assert carafe.current_backend() == "auto"
    got = carafe.carafe(x.bfloat16(), m.bfloat16(), 3, 1, 2)
    torch.testing.assert_close(got.double(), run("reference", "up", x, m, 3, 1, 2), rtol=0.05, atol=0.1)


def test_use_backend_restores_previous_setting():
    with use_backend("reference"):
        with use_backend("cpu"):
            assert carafe.current_backend() == "cpu"
        assert carafe.current_backend() == "reference"
    assert carafe.current_backend() == "auto"


# --- validation --------------------------------------------------------------------------------------------------

def _good():
    x, m = random_inputs(2, 4, 3, 5, 3, 2, 2, "up", dtype=torch.float32)
    return dict(features=x, masks=m, kernel_size=3, group_size=2, scale_factor=2)


@pytest.mark.parametrize("change,error,message", [
    (dict(features=torch.zeros(4, 3, 5)), ValueError, r"features must be a 4-D tensor .* got shape \(4, 3, 5\)"),
    (dict(masks=torch.zeros(2, 18, 6)), ValueError, r"masks must be a 4-D tensor"),
    (dict(features=[[1.0]]), TypeError, "features must be a torch.Tensor, got list"),
    (dict(features=torch.zeros(2, 4, 3, 5, dtype=torch.int64)), TypeError, "floating-point dtype, got torch.int64"),
    (dict(masks=torch.zeros(2, 18, 6, 10, dtype=torch.float64)), TypeError,
     "masks dtype torch.float64 does not match features dtype torch.float32"),
    (dict(masks=torch.zeros(2, 17, 6, 10)), ValueError, r"group_size \* kernel_size\*\*2.*got \(2, 17, 6, 10\)"),
    (dict(masks=torch.zeros(2, 18, 6, 9)), ValueError, r"\(H \* scale_factor, W \* scale_factor\).*got \(2, 18, 6, 9\)"),
    (dict(masks=torch.zeros(1, 18, 6, 10)), ValueError, r"batch size N = 2 of features, got N = 1"),
    (dict(features=torch.zeros(2, 4, 3, 5).to_sparse()), TypeError, "dense .* got layout torch.sparse_coo"),
    (dict(features=torch.zeros(2, 4, 0, 5), masks=torch.zeros(2, 18, 0, 10)), ValueError,
     r"C, H, W >= 1, got shape \(N, C, H, W\) = \(2, 4, 0, 5\)"),
    (dict(features=torch.zeros(2, 0, 3, 5)), ValueError, r"C, H, W >= 1, got shape .* = \(2, 0, 3, 5\)"),
    (dict(kernel_size=4), ValueError, "kernel_size must be odd, got 4"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=-3), ValueError, "kernel_size must be >= 1, got -3"),
    (dict(kernel_size=3.0), TypeError, r"kernel_size must be an integer, got 3.0 \(float\)"),
    (dict(group_size=3), ValueError, r"channels \(4\) must be divisible by group_size \(3\)"),
    (dict(group_size=0), ValueError, "group_size must be >= 1, got 0"),
    (dict(scale_factor=0), ValueError, "scale_factor must be >= 1, got 0"),
    (dict(scale_factor=1.5), TypeError, r"scale_factor must be an integer, got 1.5 \(float\)"),
    (dict(scale_factor=True), TypeError, r"scale_factor must be an integer, got True \(bool\)"),
])
def test_bad_inputs_are_named(change, error, message):
    args = {**_good(), **change}
    with pytest.raises(error, match=message):
        carafe.carafe(**args)


def test_bad_down_mask_size_is_named():
    x = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"ceil\(H / scale_factor\).*= \(1, 9, 3, 3\).*got \(1, 9, 2, 2\)"):
        carafe_down(x, torch.zeros(1, 9, 2, 2), 3, 1, 2)


def test_device_mismatch_is_named():
    x = torch.zeros(1, 4, 2, 2)
    m = torch.zeros(1, 9, 4, 4, device="meta")
    with pytest.raises(ValueError, match="masks are on meta but features are on cpu"):
        carafe.carafe(x, m, 3, 1, 2)


def test_flop_count_convention():
    # 2 * k^2 * C FLOPs per output pixel: at C = 256, k = 5, sigma = 2 that is 51,200 per output, 4 outputs per input.
    assert carafe.reassembly_flops((1, 256, 1, 1), 5, 2, up=True) == 4 * 2 * 25 * 256
    assert carafe.reassembly_flops((2, 8, 5, 5), 3, 2, up=False) == 2 * 9 * 8 * 2 * 3 * 3
