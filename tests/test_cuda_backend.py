"""The CUDA backend against the float64 reference, on a GPU. Every test here is skipped without one."""

from __future__ import annotations

import pytest
import torch

import carafe
from carafe.backends import cuda as cuda_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element they leave unwritten fails the comparison."""

    def poisoned(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(cuda_backend, "new_output", poisoned)


def _op(up: bool):
    return carafe.carafe if up else carafe.carafe_down


def _inputs(n, c, h, w, k, groups, sigma, up, seed=0):
    out_h, out_w = (h * sigma, w * sigma) if up else (-(-h // sigma), -(-w // sigma))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float64, generator=gen)
    logits = torch.randn(n, groups * k * k, out_h, out_w, device="cuda", dtype=torch.float64, generator=gen)
    m = torch.softmax(logits.view(n, groups, k * k, out_h, out_w), dim=2).view_as(logits)
    grad = torch.randn(n, c, out_h, out_w, device="cuda", dtype=torch.float64, generator=gen)
    return x, m, grad


def _reference(x, m, grad, k, groups, sigma, up):
    x, m = x.detach().double().requires_grad_(), m.detach().double().requires_grad_()
    with carafe.use_backend("reference"):
        out = _op(up)(x, m, k, groups, sigma)
    gx, gm = torch.autograd.grad(out, (x, m), grad.double())
    return out.detach(), gx, gm


def _cuda(x, m, grad, k, groups, sigma, up, dtype):
    x = x.detach().to(dtype).requires_grad_()
    m = m.detach().to(dtype).requires_grad_()
    with carafe.use_backend("cuda"):
        out = _op(up)(x, m, k, groups, sigma)
    gx, gm = torch.autograd.grad(out, (x, m), grad.to(dtype))
    return out.detach(), gx, gm


def _assert_close(got, want, dtype, what):
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite elements (left unwritten?)"
    rel = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert rel < TOLERANCE[dtype], f"{what}: relative error {rel:.3g} >= {TOLERANCE[dtype]}"


def _check(case, up, dtype, seed=0):
    x, m, grad = _inputs(*case, up, seed=seed)
    want = _reference(x, m, grad, *case[4:], up)
    got = _cuda(x, m, grad, *case[4:], up, dtype)
    for what, g, w in zip(("output", "grad features", "grad masks"), got, want):
        _assert_close(g, w, dtype, f"{what} {case} up={up} {dtype}")


CASES = [  # n, c, h, w, k, groups, sigma
    (2, 16, 9, 11, 5, 1, 2),
    (1, 12, 7, 5, 3, 2, 3),
    (2, 8, 6, 6, 1, 4, 1),
    (1, 8, 5, 13, 7, 2, 4),
    (3, 20, 4, 3, 5, 4, 2),
    (1, 6, 1, 1, 3, 1, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}h{}w{}k{}g{}s{}".format(*c))
def test_matches_reference(case, up, dtype):
    _check(case, up, dtype)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("sigma", [1, 2, 3, 4])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_geometry_grid(k, groups, sigma, up):
    _check((2, 4 * groups + 4 * (groups > 1), 7, 10, k, groups, sigma), up, torch.float32, seed=k * 100 + sigma)


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_many_channels(up):
    _check((1, 2048, 6, 5, 5, 4, 2), up, torch.float32)


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_empty_batch(up):
    x, m, grad = _inputs(0, 8, 5, 5, 3, 1, 2, up)
    out, gx, gm = _cuda(x, m, grad, 3, 1, 2, up, torch.float32)
    assert out.shape == grad.shape and gx.shape == x.shape and gm.shape == m.shape


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_non_contiguous_inputs(layout, up):
    k, groups, sigma = 5, 2, 2
    x, m, grad = _inputs(2, 8, 9, 9, k, groups, sigma, up)
    want = _reference(x, m, grad, k, groups, sigma, up)
    if layout == "channels_last":
        xs, ms = x.contiguous(memory_format=torch.channels_last), m.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        xs = torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2]
        ms = torch.cat([m, m], dim=3)[..., : m.shape[3]]
    else:
        xs, ms = x.transpose(2, 3).contiguous().transpose(2, 3), m.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (xs.is_contiguous() and ms.is_contiguous())
    xs, ms = xs.float().requires_grad_(), ms.float().requires_grad_()
    with carafe.use_backend("cuda"):
        out = _op(up)(xs, ms, k, groups, sigma)
    gx, gm = torch.autograd.grad(out, (xs, ms), grad.float())
    for what, g, w in zip(("output", "grad features", "grad masks"), (out, gx, gm), want):
        _assert_close(g.detach(), w, torch.float32, f"{what} {layout}")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_gradcheck_float64(up):
    x, m, _ = _inputs(1, 4, 4, 5, 3, 2, 2, up)
    x, m = x.requires_grad_(), m.requires_grad_()
    with carafe.use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda a, b: _op(up)(a, b, 3, 2, 2), (x, m))


@pytest.mark.parametrize("needs", ["features", "masks"])
def test_only_needed_gradients(needs, monkeypatch):
    launched = []
    launch = cuda_backend.launch
    monkeypatch.setattr(cuda_backend, "launch", lambda kernel, *args: launched.append(kernel) or launch(kernel, *args))
    x, m, grad = _inputs(1, 8, 6, 6, 5, 1, 2, True)
    x, m = x.float().requires_grad_(needs == "features"), m.float().requires_grad_(needs == "masks")
    with carafe.use_backend("cuda"):
        out = carafe.carafe(x, m, 5, 1, 2)
    out.backward(grad.float())
    assert launched == ["forward", f"backward_{needs}"]


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_backward_is_bitwise_reproducible(up):
    x, m, grad = _inputs(2, 64, 16, 16, 5, 2, 2, up)
    runs = [_cuda(x, m, grad, 5, 2, 2, up, torch.float32) for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_auto_selects_cuda():
    x, m, _ = _inputs(1, 4, 3, 3, 3, 1, 2, True)
    assert carafe.backends.select(x) is cuda_backend.BACKEND


def test_runs_on_current_stream():
    x, m, grad = _inputs(2, 32, 16, 16, 5, 1, 2, True)
    want = _reference(x, m, grad, 5, 1, 2, True)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), carafe.use_backend("cuda"):
        out = carafe.carafe(x.float(), m.float(), 5, 1, 2)
    torch.cuda.current_stream().wait_stream(stream)
    _assert_close(out, want, torch.float32, "output on a side stream")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_carafepack_under_autocast(dtype):
    """Under autocast the softmax normaliser returns float32 kernels, matching float32 features, so the op runs in
    float32 inside an autocast region; forward and backward must work and give finite results."""
    module = carafe.CARAFEPack(channels=16, scale_factor=2).cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out = module(x)
    out.float().square().mean().backward()
    assert out.shape == (2, 16, 16, 16) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_half_module_forward_backward():
    module = carafe.CARAFEPack(channels=16, scale_factor=2).cuda().half()
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.float16, requires_grad=True)
    out = module(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.float16 and torch.isfinite(x.grad).all()


def test_compiled_once_per_device_and_dtype():
    cuda_backend._module.cache_clear()
    for size in (5, 7, 9, 13):
        x, m, _ = _inputs(1, 8, size, size + 1, 3, 1, 2, True)
        with carafe.use_backend("cuda"):
            carafe.carafe(x.float(), m.float(), 3, 1, 2)
    assert cuda_backend._module.cache_info().currsize == 1
