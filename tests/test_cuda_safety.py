"""Every registered operator checks its tensors before a kernel sees a pointer; the CUDA backend compiles outside
graph capture (``carafe.cuda_warmup``) and runs every kernel variant correctly on any device.

The checks are backend-independent, so their tests run on the CPU; the GPU tests carry the ``cuda`` marker (skipped
with a reason on machines without one).
"""

from __future__ import annotations

import pytest
import torch

import carafe
from carafe.backends import cuda as cuda_backend
from carafe.backends.reference import reassemble
from conftest import assert_matches_oracle, reassembly_inputs

OPS = torch.ops.carafe


def _inputs(up: bool = True, device: str = "cpu", dtype=torch.float32):
    return reassembly_inputs(1, 4, 5, 6, 3, 2, 2, up, dtype=dtype, device=device, seed=3)


@pytest.mark.parametrize("op", ["carafe_backward_features", "carafe_backward_masks", "carafe_down_backward_features",
                                "carafe_down_backward_masks"])
def test_backward_op_rejects_mismatched_grad_out(op):
    up = not op.startswith("carafe_down")
    x, m, grad = _inputs(up)
    fn = getattr(OPS, op)
    with pytest.raises(TypeError, match=r"grad_out has dtype torch.float64 but features have torch.float32"):
        fn(grad.double(), x, m, 3, 2, 2)
    with pytest.raises(ValueError, match=r"grad_out must have shape"):
        fn(grad[:, :, :-1], x, m, 3, 2, 2)
    with pytest.raises(ValueError, match=r"masks must have shape"):
        fn(grad, x, m[:, :9], 3, 2, 2)


@pytest.mark.parametrize("op", ["carafe", "carafe_down"])
def test_forward_op_checks_its_arguments(op):
    x, m, _ = _inputs(op == "carafe")
    fn = getattr(OPS, op)
    with pytest.raises(TypeError, match=rf"torch.ops.carafe.{op}: masks has dtype torch.float16"):
        fn(x, m.half(), 3, 2, 2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        fn(x, m, 2, 2, 2)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        fn(x, m, 3, 0, 2)
    with pytest.raises(ValueError, match="divisible by group_size"):
        fn(x, m, 3, 3, 2)
    with pytest.raises(ValueError, match="features must be a 4-D tensor"):
        fn(x[0], m, 3, 2, 2)
    with pytest.raises(TypeError, match="features must have a floating-point dtype"):
        fn(x.long(), m, 3, 2, 2)


def test_valid_direct_calls_still_work():
    x, m, grad = _inputs(True, dtype=torch.float64)
    ref = reassemble(x.requires_grad_(), m.requires_grad_(), 3, 2, 2, True)
    gx, gm = torch.autograd.grad(ref, (x, m), grad)
    assert_matches_oracle(OPS.carafe_backward_features(grad, x, m, 3, 2, 2), gx, torch.float64, "grad features")
    assert_matches_oracle(OPS.carafe_backward_masks(grad, x, m, 3, 2, 2), gm, torch.float64, "grad masks")


def test_warmup_checks_its_arguments():
    with pytest.raises(TypeError, match="dtype must be one of"):
        carafe.cuda_warmup(device=0, dtypes=(torch.int32,))
    with pytest.raises(ValueError, match="odd integers"):
        carafe.cuda_warmup(device=0, dtypes=(torch.float32,), kernel_sizes=(4,))


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_mismatched_grad_out_on_cuda_is_refused_before_the_kernel():
    x, m, grad = _inputs(True, device="cuda")
    with pytest.raises(TypeError, match="grad_out has dtype torch.float16"):
        OPS.carafe_backward_features(grad.half(), x, m, 3, 2, 2)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        OPS.carafe_backward_masks(grad[:, :2], x, m, 3, 2, 2)
    with pytest.raises(ValueError, match="grad_out is on cpu but features are on cuda"):
        OPS.carafe_backward_masks(grad.cpu(), x, m, 3, 2, 2)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
def test_every_variant_on_the_gpu(monkeypatch, k, up, bits):
    """Each kernel-size variant and index width (64-bit forced on small tensors) against the float64 reference,
    with the fixed-k forward split into as many channel slices as there are channels."""
    if bits == 64:
        monkeypatch.setattr(cuda_backend, "MAX_32BIT_COUNT", 0)
    monkeypatch.setattr(cuda_backend, "THREADS_PER_SM", 10 ** 9)
    cuda_backend._target_threads.cache_clear()
    case = (2, 6, 9, 10, k, 2, 2)
    x, m, grad = reassembly_inputs(*case, up, seed=k)
    ref = reassemble(x.requires_grad_(), m.requires_grad_(), k, 2, 2, up)
    gx, gm = torch.autograd.grad(ref, (x, m), grad)
    op = carafe.carafe if up else carafe.carafe_down
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xc, mc, gc = (t.detach().to("cuda", dtype).requires_grad_() for t in (x, m, grad))
        with carafe.use_backend("cuda"):
            out = op(xc, mc, k, 2, 2)
            got_gx, got_gm = torch.autograd.grad(out, (xc, mc), gc)
        for name, got, want in (("output", out, ref), ("grad features", got_gx, gx), ("grad masks", got_gm, gm)):
            assert_matches_oracle(got, want, dtype, f"{name} k={k} i{bits} {dtype}")
    cuda_backend._target_threads.cache_clear()


@pytest.mark.cuda
def test_tensor_on_a_non_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (tensors on cuda:1 while cuda:0 is current)")
    x, m, grad = reassembly_inputs(1, 8, 6, 6, 5, 1, 2, True, seed=1)
    ref = reassemble(x, m, 5, 1, 2, True)
    with torch.cuda.device(0), carafe.use_backend("cuda"):
        out = carafe.carafe(x.to("cuda:1", torch.float32), m.to("cuda:1", torch.float32), 5, 1, 2)
    assert out.device == torch.device("cuda:1")
    assert_matches_oracle(out, ref, torch.float32, "output on cuda:1")


@pytest.mark.cuda
def test_cuda_graph_capture_after_warmup():
    names = carafe.cuda_warmup(dtypes=(torch.float32,), kernel_sizes=(5,))
    assert "carafe_forward_k5_i32_f32" in names and "carafe_backward_masks_k5_i64_f32" in names
    x, m, _ = reassembly_inputs(2, 16, 8, 8, 5, 1, 2, True, dtype=torch.float32, device="cuda", seed=2,
                                softmax=True)
    with carafe.use_backend("cuda"):
        eager = carafe.carafe(x, m, 5, 1, 2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = carafe.carafe(x, m, 5, 1, 2)
    x.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, 2 * eager, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_compiling_inside_graph_capture_is_refused(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_MODULES", {})  # nothing compiled yet
    x, m, _ = reassembly_inputs(1, 4, 4, 4, 3, 1, 2, True, dtype=torch.float64, device="cuda", seed=4)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cuda_warmup"):
        with carafe.use_backend("cuda"), torch.cuda.graph(graph):
            carafe.carafe(x, m, 3, 1, 2)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("masks_layout", ["channels_last", "nchw"])
def test_channels_last_runs_the_nhwc_kernels(monkeypatch, masks_layout, up, k, bits):
    """Channels_last features take the NHWC kernels (every variant, both index widths, masks in either layout), the
    kernels read the caller's tensors without a copy, and forward and both gradients match the float64 reference
    in the layout of their input."""
    if bits == 64:
        monkeypatch.setattr(cuda_backend, "MAX_32BIT_COUNT", 0)
    launched = []
    launch = cuda_backend.launch

    def recording(kernel, a, b, out, geometry):  # noqa: ANN001, ANN202
        launched.append((kernel, a.data_ptr(), b.data_ptr(), cuda_backend.tensor_layout(kernel, a, b, out)))
        return launch(kernel, a, b, out, geometry)

    monkeypatch.setattr(cuda_backend, "launch", recording)
    cl = torch.channels_last
    case = (2, 72, 9, 10, k, 2, 2)  # 36 channels a group: full and partial blocks of lanes
    x, m, grad = reassembly_inputs(*case, up, seed=k + 11)
    ref = reassemble(x.requires_grad_(), m.requires_grad_(), k, 2, 2, up)
    gx, gm = torch.autograd.grad(ref, (x, m), grad)
    op = carafe.carafe if up else carafe.carafe_down
    masks_format = cl if masks_layout == "channels_last" else torch.contiguous_format
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xc = x.detach().to("cuda", dtype).contiguous(memory_format=cl).requires_grad_()
        mc = m.detach().to("cuda", dtype).contiguous(memory_format=masks_format).requires_grad_()
        gc = grad.to("cuda", dtype).contiguous(memory_format=cl)
        launched.clear()
        with carafe.use_backend("cuda"):
            out = op(xc, mc, k, 2, 2)
            got_gx, got_gm = torch.autograd.grad(out, (xc, mc), gc)
        layouts = {kernel: layout for kernel, _, _, layout in launched}
        assert set(layouts) == {"forward", "backward_features", "backward_masks"}
        assert all(layout == ("nhwc", masks_layout == "channels_last") for layout in layouts.values()), layouts
        forward = next(entry for entry in launched if entry[0] == "forward")
        assert forward[1:3] == (xc.data_ptr(), mc.data_ptr()), "the forward pass copied its inputs"
        assert out.is_contiguous(memory_format=cl) and got_gx.is_contiguous(memory_format=cl)
        assert got_gm.is_contiguous(memory_format=masks_format)
        for name, got, want in (("output", out, ref), ("grad features", got_gx, gx), ("grad masks", got_gm, gm)):
            assert_matches_oracle(got, want, dtype, f"{name} k={k} i{bits} {dtype} masks {masks_layout}")
