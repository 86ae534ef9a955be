"""carafe / carafe_down: one tester per direction, run over backends x devices x dtypes, against the float64
brute-force oracle and the float64 reference (gradients, layouts, edge cases, the registered operators' opcheck,
compile, export, vmap, FLOP counting, ONNX); then backend selection, input validation and the CUDA backend's own
guarantees. The shared oracle, input factories, tolerances and the GPU skip live in conftest.py.
"""

from __future__ import annotations

import importlib
import io
import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import carafe
from carafe import BackendUnavailableError, CARAFEDownPack, CARAFEPack, reassembly_flops, use_backend
from carafe.backends import cuda as cuda_backend
from carafe.costs import conv_flops, flops_per_pixel
from carafe.decomposition import reassemble_standard_ops
from carafe.library import OPS
from carafe.naive import carafe_down_unfold, carafe_unfold
from conftest import (BACKEND_DEVICE_DTYPES, BACKEND_DEVICES, DEVICES, assert_matches_oracle, brute_force,
                      out_size, reassembly_inputs)

# The compiled backends (the reference is the oracle they are compared with).
COMPILED_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "reference"]
# Every backend and dtype but the reference in float64 (the oracle itself) and in half precision (it accumulates in
# the input dtype, so only test_auto_runs_half_precision_on_the_reference's loose bound holds for it).
NON_ORACLE_DTYPES = [p for p in BACKEND_DEVICE_DTYPES if p.values[0] != "reference" or p.values[2] == torch.float32]
BRUTE_FORCE_CASES = [(3, 1, 2, 3, 4), (5, 2, 2, 4, 3), (1, 1, 3, 2, 2), (3, 2, 3, 5, 4), (7, 1, 1, 3, 5),
                     (5, 4, 4, 2, 3)]  # k, groups, scale, h, w
DTYPE_CASES = [(2, 16, 9, 11, 5, 1, 2), (1, 12, 7, 5, 3, 2, 3), (2, 8, 6, 6, 1, 4, 1), (1, 8, 5, 13, 7, 2, 4),
               (3, 20, 4, 3, 5, 4, 2), (1, 6, 1, 1, 3, 1, 2)]  # n, c, h, w, k, groups, scale
# k x groups x scale x (h, w), with channels per group 8, 6 and 5: one, two and a partial chunk of the CUDA kernels'
# four channels per thread.
GEOMETRY_GRID = list(itertools.product([1, 3, 5, 7], [1, 2, 4], [1, 2, 3, 4], [(5, 6), (6, 5)]))
GRID_CHANNELS = {1: 8, 2: 12, 4: 20}


@pytest.fixture(autouse=True)
def nan_filled_cuda_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the CUDA kernels write starts as NaN, so an element they leave unwritten fails a comparison."""
    launch = cuda_backend.launch

    def poisoned(kernel, a, b, out, geometry):  # noqa: ANN001, ANN202
        return launch(kernel, a, b, out.fill_(float("nan")), geometry)

    monkeypatch.setattr(cuda_backend, "launch", poisoned)


def run(fn: Callable, backend: str, x, m, k, g, s):  # noqa: ANN001, ANN201
    """``fn`` (carafe.carafe or carafe.carafe_down) on ``backend``."""
    with use_backend(backend):
        return fn(x, m, k, g, s)


def run_with_grads(fn: Callable, backend: str, x, m, grad, k, g, s):  # noqa: ANN001, ANN201
    """Output, gradient of features and gradient of masks of ``fn`` on ``backend`` for the output gradient ``grad``."""
    x = x.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_()
    out = run(fn, backend, x, m, k, g, s)
    gx, gm = torch.autograd.grad(out, (x, m), grad.to(out.dtype))
    return out.detach(), gx, gm


class ReassemblyTester:
    """Everything one direction of the reassembly must do; ``TestCarafe`` and ``TestCarafeDown`` set the direction."""

    up: bool
    fn: Callable
    naive_fn: Callable
    module_cls: type[torch.nn.Module]

    def run(self, backend: str, x, m, k, g, s):  # noqa: ANN001, ANN201
        return run(self.fn, backend, x, m, k, g, s)

    def run_with_grads(self, backend: str, x, m, grad, k, g, s):  # noqa: ANN001, ANN201
        return run_with_grads(self.fn, backend, x, m, grad, k, g, s)

    def oracle_with_grads(self, x, m, grad, k, g, s):  # noqa: ANN001, ANN201
        """The float64 reference's output and gradients, on the CPU."""
        return self.run_with_grads("reference", x.double().cpu(), m.double().cpu(), grad.double().cpu(), k, g, s)

    def inputs(self, n, c, h, w, k, g, s, **kwargs):  # noqa: ANN001, ANN201
        return reassembly_inputs(n, c, h, w, k, g, s, self.up, **kwargs)

    def module(self) -> torch.nn.Module:
        torch.manual_seed(0)
        if self.up:
            return CARAFEPack(16, 2, up_group=2).eval()
        return CARAFEDownPack(16, 2, down_kernel=3).eval()

    # --- the oracle --------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    @pytest.mark.parametrize("k,g,s,h,w", BRUTE_FORCE_CASES)
    def test_matches_brute_force(self, backend, device, k, g, s, h, w):
        x, m, _ = self.inputs(2, 4, h, w, k, g, s, device=device)
        expected = brute_force(x.cpu().numpy(), m.cpu().numpy(), k, g, s, self.up)
        np.testing.assert_allclose(self.run(backend, x, m, k, g, s).cpu().numpy(), expected, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("k,g,s,h,w", BRUTE_FORCE_CASES)
    def test_naive_baseline_matches_brute_force(self, k, g, s, h, w):
        x, m, _ = self.inputs(2, 4, h, w, k, g, s)
        expected = brute_force(x.numpy(), m.numpy(), k, g, s, self.up)
        np.testing.assert_allclose(self.naive_fn(x, m, k, g, s).numpy(), expected, rtol=1e-12, atol=1e-12)

    # --- every backend and dtype against the float64 reference -------------------------------------------------

    @pytest.mark.parametrize("backend,device,dtype", NON_ORACLE_DTYPES)
    def test_matches_reference_in_every_dtype(self, backend, device, dtype):
        for case in DTYPE_CASES:
            x, m, grad = self.inputs(*case, device=device, softmax=True)
            want = self.oracle_with_grads(x, m, grad, *case[4:])
            got = self.run_with_grads(backend, x.to(dtype), m.to(dtype), grad, *case[4:])
            for what, a, b in zip(("output", "grad features", "grad masks"), got, want):
                assert_matches_oracle(a, b, dtype, f"{what} {case} {dtype}")

    @pytest.mark.parametrize("backend,device", COMPILED_BACKEND_DEVICES)
    def test_geometry_grid(self, backend, device):
        for k, g, s, (h, w) in GEOMETRY_GRID:
            x, m, grad = self.inputs(2, GRID_CHANNELS[g], h, w, k, g, s, device=device, seed=k * 100 + s, softmax=True)
            want = self.oracle_with_grads(x, m, grad, k, g, s)
            got = self.run_with_grads(backend, x.float(), m.float(), grad, k, g, s)
            for what, a, b in zip(("output", "grad features", "grad masks"), got, want):
                assert_matches_oracle(a, b, torch.float32, f"{what} k={k} g={g} s={s} {h}x{w}")

    @pytest.mark.parametrize("backend,device", COMPILED_BACKEND_DEVICES)
    def test_many_channels(self, backend, device):
        x, m, grad = self.inputs(1, 2048, 6, 5, 5, 4, 2, device=device, softmax=True)
        want = self.oracle_with_grads(x, m, grad, 5, 4, 2)
        got = self.run_with_grads(backend, x.float(), m.float(), grad, 5, 4, 2)
        for what, a, b in zip(("output", "grad features", "grad masks"), got, want):
            assert_matches_oracle(a, b, torch.float32, what)

    @pytest.mark.parametrize("backend,device", COMPILED_BACKEND_DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_wide_maps(self, backend, device, dtype):
        # Maps wide and tall enough that the CPU kernels run several vectors per row with a partial last one,
        # several tiles of rows per image, and channel blocks with a remainder (the small grids never do).
        for k, g, s, (h, w) in [(5, 2, 2, (37, 41)), (3, 1, 3, (19, 35)), (5, 1, 4, (9, 21)), (7, 2, 1, (12, 40))]:
            x, m, grad = self.inputs(2, 22, h, w, k, g, s, device=device, seed=k + s, softmax=True)
            want = self.oracle_with_grads(x, m, grad, k, g, s)
            got = self.run_with_grads(backend, x.to(dtype), m.to(dtype), grad, k, g, s)
            for what, a, b in zip(("output", "grad features", "grad masks"), got, want):
                assert_matches_oracle(a, b, dtype, f"{what} k={k} g={g} s={s} {h}x{w} {dtype}")

    # --- gradients -----------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    @pytest.mark.parametrize("k,g,s,h,w", [(3, 2, 2, 3, 4), (5, 1, 3, 2, 3), (1, 1, 2, 3, 3)])
    def test_gradcheck(self, backend, device, k, g, s, h, w):
        x, m, _ = self.inputs(1, 4, h, w, k, g, s, device=device)
        with use_backend(backend):
            assert torch.autograd.gradcheck(lambda a, b: self.fn(a, b, k, g, s),
                                            (x.requires_grad_(), m.requires_grad_()), eps=1e-6, atol=1e-7)

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    def test_second_derivatives(self, backend, device):
        x, m, _ = self.inputs(1, 4, 2, 3, 3, 2, 2, device=device)
        with use_backend(backend):
            assert torch.autograd.gradgradcheck(lambda a, b: self.fn(a, b, 3, 2, 2),
                                                (x.requires_grad_(), m.requires_grad_()), atol=1e-7)

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    def test_only_requested_gradients_are_computed(self, backend, device, monkeypatch):
        computed = []
        implementation = importlib.import_module(f"carafe.backends.{backend}").BACKEND
        compute = implementation.compute
        monkeypatch.setattr(implementation, "compute", lambda kernel, *args: computed.append(kernel)
                            or compute(kernel, *args))
        x, m, grad = self.inputs(1, 8, 6, 6, 5, 1, 2, device=device)
        for need in ("features", "masks"):
            computed.clear()
            xx, mm = x.clone().requires_grad_(need == "features"), m.clone().requires_grad_(need == "masks")
            with use_backend(backend):  # the backward ops choose their backend when they run
                self.fn(xx, mm, 5, 1, 2).backward(grad)
            assert (xx.grad is not None) == (need == "features") and (mm.grad is not None) == (need == "masks")
            assert computed == ["forward", f"backward_{need}"]

    @pytest.mark.parametrize("backend,device", COMPILED_BACKEND_DEVICES)
    def test_backward_is_bitwise_reproducible(self, backend, device):
        x, m, grad = self.inputs(2, 64, 16, 16, 5, 2, 2, device=device, dtype=torch.float32)
        runs = [self.run_with_grads(backend, x, m, grad, 5, 2, 2) for _ in range(3)]
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert torch.equal(a, b)

    # --- layouts, sizes, special values ----------------------------------------------------------------------------

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    def test_layouts(self, backend, device):
        x, m, grad = self.inputs(2, 6, 5, 7, 3, 2, 2, device=device)
        expected = self.run_with_grads(backend, x, m, grad, 3, 2, 2)
        assert all(t.is_contiguous() for t in expected)
        variants = {
            "channels_last": (x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)),
            "transposed views": (x.transpose(2, 3).contiguous().transpose(2, 3),
                                 m.transpose(2, 3).contiguous().transpose(2, 3)),
            "strided slices": (torch.stack([x, x], 2).flatten(1, 2)[:, ::2],
                               torch.nn.functional.pad(m, (0, 1))[..., :-1]),
            "mixed layouts": (x.to(memory_format=torch.channels_last), m),
        }
        for name, (xv, mv) in variants.items():
            assert torch.equal(xv, x) and torch.equal(mv, m) and not (xv.is_contiguous() and mv.is_contiguous())
            got = self.run_with_grads(backend, xv, mv, grad, 3, 2, 2)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda e: f"{name}: {e}")
            if name == "channels_last":  # the output and each gradient take their input's layout
                assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got)

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    @pytest.mark.parametrize("n,h,w", [(0, 4, 4), (2, 1, 1), (1, 1, 6), (1, 5, 1)])
    def test_empty_batch_and_single_pixel_maps(self, backend, device, n, h, w):
        x, m, grad = self.inputs(n, 4, h, w, 3, 2, 3, device=device)
        out, gx, gm = self.run_with_grads(backend, x, m, grad, 3, 2, 3)
        assert out.shape == (n, 4, *out_size(h, w, 3, self.up))
        assert gx.shape == x.shape and gm.shape == m.shape
        if n:
            expected = brute_force(x.cpu().numpy(), m.cpu().numpy(), 3, 2, 3, self.up)
            np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    def test_negative_bit_views_keep_their_sign(self, backend, device):
        x, m, _ = self.inputs(1, 4, 5, 5, 3, 1, 2, device=device)
        x_neg, m_neg = torch._neg_view(x), torch._neg_view(m)
        assert x_neg.is_neg() and m_neg.is_neg()
        plain = self.run(backend, x, m, 3, 1, 2)
        torch.testing.assert_close(self.run(backend, x_neg, m, 3, 1, 2), -plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(self.run(backend, x, m_neg, 3, 1, 2), -plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(self.run(backend, x_neg, m_neg, 3, 1, 2), plain, rtol=0, atol=1e-12)

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    def test_nan_weights_of_taps_outside_the_map_contribute_zero(self, backend, device):
        # A 1x1 map with k = 3: only the centre tap (index 4) lies inside, so out = x * centre weight exactly, and the
        # gradient of x is the centre weight times grad_out, whatever the eight outside weights hold.
        out_hw = out_size(1, 1, 2, self.up)
        x = torch.full((1, 2, 1, 1), 3.0, dtype=torch.float64, device=device, requires_grad=True)
        m = torch.full((1, 9, *out_hw), float("nan"), dtype=torch.float64, device=device)
        m[:, 4] = 0.5
        m[:, 0] = float("inf")
        m.requires_grad_()
        out = self.run(backend, x, m, 3, 1, 2)
        assert torch.equal(out, torch.full_like(out, 1.5)) and out.shape == (1, 2, *out_hw)
        out.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 0.5 * out_hw[0] * out_hw[1]))
        expected_mask_grad = torch.zeros_like(m)
        expected_mask_grad[:, 4] = 2 * 3.0  # two channels of value 3 read the centre tap
        assert torch.equal(m.grad, expected_mask_grad)

    # --- the registered operators ------------------------------------------------------------------------------

    @pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
    @pytest.mark.parametrize("k,g,s", [(3, 1, 2), (1, 2, 3), (5, 2, 1)])
    def test_opcheck_every_registered_op(self, backend, device, k, g, s):
        x, m, grad = self.inputs(2, 4, 3, 4, k, g, s, device=device)
        x, m, grad = x.requires_grad_(), m.requires_grad_(), grad.requires_grad_()
        with use_backend(backend):
            for kernel, op in OPS["carafe" if self.up else "carafe_down"].items():
                args = (x, m, k, g, s) if kernel == "forward" else (grad, x, m, k, g, s)
                torch.library.opcheck(op, args)
                if kernel == "forward":  # and a channels_last input, whose result the fake must lay out the same way
                    torch.library.opcheck(op,
                                          (x.detach().to(memory_format=torch.channels_last), m, k, g, s))

    @pytest.mark.parametrize("backend", ["auto", *carafe.BACKENDS])
    def test_fake_and_meta_tensors_trace_without_a_kernel(self, backend):
        # The dispatcher sends fake and meta tensors to the shape function, whatever backend is selected.
        out_hw = out_size(5, 6, 2, self.up)
        with use_backend(backend):
            with FakeTensorMode():
                fake = self.fn(torch.randn(2, 8, 5, 6), torch.randn(2, 9, *out_hw), 3, 1, 2)
            meta = self.fn(torch.empty(2, 8, 5, 6, device="meta"), torch.empty(2, 9, *out_hw, device="meta"), 3, 1, 2)
        assert fake.shape == (2, 8, *out_hw) and meta.shape == (2, 8, *out_hw) and meta.device.type == "meta"

    @pytest.mark.parametrize("device", DEVICES)
    def test_vmap_folds_the_mapped_dimension_into_the_batch(self, device):
        x, m, _ = self.inputs(2, 4, 3, 4, 3, 1, 2, device=device)
        xs = torch.stack([x, 2 * x, -x])
        mapped = torch.func.vmap(lambda a: self.fn(a, m, 3, 1, 2))(xs)
        for i in range(3):
            torch.testing.assert_close(mapped[i], self.fn(xs[i], m, 3, 1, 2), rtol=0, atol=0)
        both = torch.func.vmap(self.fn, in_dims=(0, 0, None, None, None))(xs, torch.stack([m] * 3), 3, 1, 2)
        torch.testing.assert_close(both, mapped, rtol=0, atol=0)

    def test_functorch_differentiation_raises_a_clear_error(self):
        x, m, _ = self.inputs(2, 4, 3, 4, 3, 1, 2)
        with pytest.raises(RuntimeError, match="do not support torch.func.grad.*use torch.autograd.grad"):
            torch.func.grad(lambda a: self.fn(a, m, 3, 1, 2).sum())(x)

    def test_compile_fullgraph_matches_eager_forward_and_backward(self):
        torch._dynamo.reset()
        module = self.module()
        x = torch.randn(2, 16, 9, 7, requires_grad=True)
        compiled = torch.compile(module, fullgraph=True)
        eager_out = module(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, *module.parameters()))
        with use_backend("reference"):  # the backend switch is read when the op runs, inside the compiled graph too
            compiled_out = compiled(x)
            compiled_grads = torch.autograd.grad(compiled_out.square().sum(), (x, *module.parameters()))
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
        for a, b in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
    def test_export_with_dynamic_height_and_width(self, strict):
        module = self.module()
        # torch's contiguity checks guard a 1-pixel output, so a downsampler's dynamic sizes start at 3.
        low = 2 if self.up else 3
        dims = {2: torch.export.Dim("h", min=low, max=256), 3: torch.export.Dim("w", min=low, max=256)}
        program = torch.export.export(module, (torch.randn(2, 16, 9, 7),), dynamic_shapes=(dims,), strict=strict)
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert f"carafe.{'carafe' if self.up else 'carafe_down'}.default" in targets
        for shape in [(2, 16, 9, 7), (2, 16, 4, 13)]:
            x = torch.randn(shape)
            torch.testing.assert_close(program.module()(x), module(x), rtol=1e-6, atol=1e-6)

    def test_fx_symbolic_trace_keeps_the_reassembly_as_one_call(self):
        module = self.module()
        traced = torch.fx.symbolic_trace(module)
        calls = [node.target for node in traced.graph.nodes if node.op == "call_function"]
        assert calls.count(self.fn) == 1
        x = torch.randn(2, 16, 9, 7)
        torch.testing.assert_close(traced(x), module(x), rtol=0, atol=0)

    def test_flop_counter_counts_the_backward_ops(self):
        x, m, _ = self.inputs(2, 4, 3, 4, 5, 1, 2)
        x.requires_grad_()
        with FlopCounterMode(display=False) as counter:
            self.fn(x, m.requires_grad_(), 5, 1, 2).sum().backward()
        assert counter.get_total_flops() == 3 * reassembly_flops(x.shape, 5, 2, up=self.up)

    # --- ONNX ----------------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("k,g,s", [(5, 1, 2), (3, 2, 3), (1, 4, 1), (7, 2, 4)])
    def test_standard_op_decomposition_matches_the_reference(self, k, g, s):
        for h, w in [(5, 6), (1, 1), (4, 7)]:
            x, m, _ = self.inputs(2, 8, h, w, k, g, s)
            m[:, 0] = float("nan")  # tap (0, 0) lies outside the map for the top-left outputs: must contribute zero
            expected = self.run("reference", x, m, k, g, s)
            got = reassemble_standard_ops(x, m, k, g, s, self.up)
            inside = ~torch.isnan(expected)
            assert torch.equal(inside, ~torch.isnan(got))
            torch.testing.assert_close(got[inside], expected[inside], rtol=1e-12, atol=1e-12)

    def test_onnx_export_runs_in_onnxruntime(self):
        # the TorchScript exporter here; the dynamo exporter (about 5 s an export) takes both ops in one graph in
        # test_onnx_export_of_a_model_with_both_ops
        assert_onnx_export_matches_eager(self.module(), 16, dynamo=False)


class TestCarafe(ReassemblyTester):
    up = True
    fn = staticmethod(carafe.carafe)
    naive_fn = staticmethod(carafe_unfold)


class TestCarafeDown(ReassemblyTester):
    up = False
    fn = staticmethod(carafe.carafe_down)
    naive_fn = staticmethod(carafe_down_unfold)


def test_brute_force_oracle_on_a_hand_computed_case():
    # 1x1 image, k = 3, up by 2: only the centre tap sees the pixel, so out = x * centre weight at every output.
    x = np.full((1, 1, 1, 1), 3.0)
    m = np.arange(9 * 4, dtype=float).reshape(1, 9, 2, 2)
    np.testing.assert_array_equal(brute_force(x, m, 3, 1, 2, up=True), 3.0 * m[:, 4:5])
    # Down by 2 on a 3x3 ramp with all-ones kernels: output (0, 0) sums the 2x2 top-left block (others are padding).
    ramp = np.arange(9, dtype=float).reshape(1, 1, 3, 3)
    ones = np.ones((1, 9, 2, 2))
    # Centres (0, 0), (0, 2), (2, 0), (2, 2); each window keeps its 2x2 part inside the image.
    np.testing.assert_array_equal(brute_force(ramp, ones, 3, 1, 2, up=False)[0, 0],
                                  [[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]])


def test_cpu_backend_is_independent_of_thread_count():
    x, m, grad = reassembly_inputs(3, 16, 9, 7, 5, 2, 2, True, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            results.append(run_with_grads(carafe.carafe, "cpu", x, m, grad, 5, 2, 2))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- FLOP counting and ONNX of whole modules ------------------------------------------------------------------------

def test_flop_count_convention():
    # 2 * k^2 * C FLOPs per output pixel: at C = 256, k = 5, sigma = 2 that is 51,200 per output, 4 outputs per input.
    assert carafe.reassembly_flops((1, 256, 1, 1), 5, 2, up=True) == 4 * 2 * 25 * 256
    assert carafe.reassembly_flops((2, 8, 5, 5), 3, 2, up=False) == 2 * 9 * 8 * 2 * 3 * 3


def test_flop_counter_equals_the_analytic_count():
    module = CARAFEPack(256, 2)
    h, w = 6, 5
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.randn(1, 256, h, w))
    # carafe/costs.py's terms: the 1x1 compressor, the 3x3 encoder (torch's counter leaves biases out) and the
    # reassembly, 2 k^2 C per output pixel.
    analytic = (conv_flops(256, 64, 1, bias=False) + conv_flops(64, 4 * 25, 3, bias=False)) * h * w \
        + reassembly_flops((1, 256, h, w), 5, 2, up=True)
    assert counter.get_total_flops() == analytic
    # ... and the papers' per-pixel figure (199,496 at C = 256, sigma = 2) is that plus the two convolutions' biases.
    biases = (conv_flops(256, 64, 1) - conv_flops(256, 64, 1, bias=False)
              + conv_flops(64, 100, 3) - conv_flops(64, 100, 3, bias=False))
    assert flops_per_pixel(module) * h * w == counter.get_total_flops() + biases * h * w
    assert flops_per_pixel(module) == 199_496


class _SmallModel(torch.nn.Module):
    """A downsampler, a conv and an upsampler back to the input size: both ops in one exported graph."""

    def __init__(self) -> None:
        super().__init__()
        self.down = CARAFEDownPack(8, 2, down_kernel=3)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = CARAFEPack(8, 2, up_group=2, up_kernel=5, compressed_channels=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.conv(self.down(x))))


def _onnx_bytes(module, x, dynamo):  # noqa: ANN001, ANN202
    if dynamo:
        dims = {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
        return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=(dims,),
                                 verbose=False).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    return buffer.getvalue()


def assert_onnx_export_matches_eager(module: torch.nn.Module, channels: int, dynamo: bool) -> None:
    """Export ``module`` with standard ONNX ops only and run it in onnxruntime at two input sizes (and batch sizes,
    for the TorchScript exporter): within 1e-4 of eager."""
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    data = _onnx_bytes(module, torch.randn(1, channels, 12, 10), dynamo)
    nodes = onnx.load_from_string(data).graph.node
    ops = {node.op_type for node in nodes}
    assert ops, "empty graph"
    assert all(node.domain in ("", "ai.onnx") for node in nodes), ops
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for shape in [(1, channels, 12, 10), (1 if dynamo else 2, channels, 8, 14)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        expected = module(x).detach().numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_a_model_with_both_ops(dynamo):
    torch.manual_seed(0)
    assert_onnx_export_matches_eager(_SmallModel().eval(), 8, dynamo)


# --- backend selection ----------------------------------------------------------------------------------------------

def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown CARAFE backend 'fastest'"):
        with use_backend("fastest"):
            pass


def test_forcing_an_unusable_backend_says_why():
    x, m, _ = reassembly_inputs(1, 4, 3, 3, 3, 1, 2, True)
    with pytest.raises(BackendUnavailableError, match="'cuda'.*cannot run"):
        run(carafe.carafe, "cuda", x, m, 3, 1, 2)
    with pytest.raises(BackendUnavailableError, match="float32 and float64, got torch.float16"):
        run(carafe.carafe, "cpu", x.half(), m.half(), 3, 1, 2)


def test_auto_runs_half_precision_on_the_reference():
    x, m, _ = reassembly_inputs(1, 4, 3, 3, 3, 1, 2, True)
    assert carafe.current_backend() == "auto"
    got = carafe.carafe(x.bfloat16(), m.bfloat16(), 3, 1, 2)
    torch.testing.assert_close(got.double(), run(carafe.carafe, "reference", x, m, 3, 1, 2), rtol=0.05, atol=0.1)


@pytest.mark.cuda
def test_auto_selects_cuda():
    x, _, _ = reassembly_inputs(1, 4, 3, 3, 3, 1, 2, True, device="cuda")
    assert carafe.backends.select(x) is cuda_backend.BACKEND


def test_use_backend_restores_previous_setting():
    with use_backend("reference"):
        with use_backend("cpu"):
            assert carafe.current_backend() == "cpu"
        assert carafe.current_backend() == "reference"
    assert carafe.current_backend() == "auto"


# --- validation -----------------------------------------------------------------------------------------------------

def _good():  # noqa: ANN202
    x, m, _ = reassembly_inputs(2, 4, 3, 5, 3, 2, 2, True, dtype=torch.float32)
    return dict(features=x, masks=m, kernel_size=3, group_size=2, scale_factor=2)


@pytest.mark.parametrize("change,error,message", [
    (dict(features=torch.zeros(4, 3, 5)), ValueError, r"features must be a 4-D tensor .* got shape \(4, 3, 5\)"),
    (dict(masks=torch.zeros(2, 18, 6)), ValueError, r"masks must be a 4-D tensor"),
    (dict(features=[[1.0]]), TypeError, "features must be a torch.Tensor, got list"),
    (dict(features=torch.zeros(2, 4, 3, 5, dtype=torch.int64)), TypeError, "floating-point dtype, got torch.int64"),
    (dict(masks=torch.zeros(2, 18, 6, 10, dtype=torch.float64)), TypeError,
     "masks dtype torch.float64 does not match features dtype torch.float32"),
    (dict(masks=torch.zeros(2, 17, 6, 10)), ValueError, r"group_size \* kernel_size\*\*2.*got \(2, 17, 6, 10\)"),
    (dict(masks=torch.zeros(2, 18, 6, 9)), ValueError,
     r"shape \(N, group_size \* kernel_size\*\*2, H \* scale_factor, W \* scale_factor\) = \(2, 18, 6, 10\) .*"
     r"got \(2, 18, 6, 9\) \(its height and width differ\)"),
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
        carafe.carafe_down(x, torch.zeros(1, 9, 2, 2), 3, 1, 2)


def test_device_mismatch_is_named():
    x = torch.zeros(1, 4, 2, 2)
    m = torch.zeros(1, 9, 4, 4, device="meta")
    with pytest.raises(ValueError, match="masks are on meta but features are on cpu"):
        carafe.carafe(x, m, 3, 1, 2)


# --- what only the CUDA backend promises ----------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    x, m, grad = reassembly_inputs(2, 32, 16, 16, 5, 1, 2, True, device="cuda", softmax=True)
    want = run(carafe.carafe, "reference", x.double().cpu(), m.double().cpu(), 5, 1, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), use_backend("cuda"):
        out = carafe.carafe(x.float(), m.float(), 5, 1, 2)
    torch.cuda.current_stream().wait_stream(stream)
    assert_matches_oracle(out, want, torch.float32, "output on a side stream")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_cuda_carafepack_under_autocast(dtype):
    """Under autocast the softmax normaliser returns float32 kernels, matching float32 features, so the op runs in
    float32 inside an autocast region; forward and backward must work and give finite results."""
    module = CARAFEPack(channels=16, scale_factor=2).cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out = module(x)
    out.float().square().mean().backward()
    assert out.shape == (2, 16, 16, 16) and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.cuda
def test_cuda_half_module_forward_backward():
    module = CARAFEPack(channels=16, scale_factor=2).cuda().half()
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.float16, requires_grad=True)
    out = module(x)
    out.float().square().mean().backward()
    assert out.dtype == torch.float16 and torch.isfinite(x.grad).all()


@pytest.mark.cuda
def test_cuda_kernels_compile_once_per_device_and_dtype():
    cuda_backend._module.cache_clear()
    for size in (5, 7, 9, 13):
        x, m, _ = reassembly_inputs(1, 8, size, size + 1, 3, 1, 2, True, device="cuda", dtype=torch.float32)
        with use_backend("cuda"):
            carafe.carafe(x, m, 3, 1, 2)
    assert cuda_backend._module.cache_info().currsize == 1
