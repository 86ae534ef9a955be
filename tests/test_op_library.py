"""The registered operators (carafe/library.py): opcheck, compile, export, vmap, FLOP counting and ONNX export.

Every comparison is against eager execution of the same module, whose correctness the oracle tests (test_ops.py)
establish against brute-force loops.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import carafe
from carafe import CARAFEDownPack, CARAFEPack, reassembly_flops, use_backend
from carafe.costs import conv_flops, flops_per_pixel
from carafe.decomposition import reassemble_standard_ops
from carafe.library import OPS

BACKENDS = ["reference", "cpu"]


def _inputs(k, g, s, up, dtype=torch.float64, n=2, c=4, h=3, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out_hw = (h * s, w * s) if up else ((h - 1) // s + 1, (w - 1) // s + 1)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
    m = torch.randn(n, g * k * k, *out_hw, generator=gen, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, c, *out_hw, generator=gen, dtype=dtype, requires_grad=True)
    return x, m, grad


OPCHECK_GRID = list(itertools.product(["carafe", "carafe_down"], [(3, 1, 2), (1, 2, 3), (5, 2, 1)], BACKENDS))


@pytest.mark.parametrize("direction,kgs,backend", OPCHECK_GRID,
                         ids=[f"{d}-k{k}g{g}s{s}-{b}" for d, (k, g, s), b in OPCHECK_GRID])
def test_opcheck_every_registered_op(direction, kgs, backend):
    k, g, s = kgs
    x, m, grad = _inputs(k, g, s, direction == "carafe")
    with use_backend(backend):
        for kernel, op in OPS[direction].items():
            args = (x, m, k, g, s) if kernel == "forward" else (grad, x, m, k, g, s)
            torch.library.opcheck(op._opoverload, args)
            if kernel == "forward":  # and a channels_last input, whose result the fake must lay out the same way
                torch.library.opcheck(op._opoverload, (x.detach().to(memory_format=torch.channels_last), m, k, g, s))


@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives(up, backend):
    x, m, _ = _inputs(3, 2, 2, up)
    op = carafe.carafe if up else carafe.carafe_down
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda a, b: op(a, b, 3, 2, 2), (x, m), atol=1e-7)


def test_vmap_folds_the_mapped_dimension_into_the_batch():
    x, m, _ = _inputs(3, 1, 2, True)
    xs = torch.stack([x.detach(), 2 * x.detach(), -x.detach()])
    mapped = torch.func.vmap(lambda a: carafe.carafe(a, m.detach(), 3, 1, 2))(xs)
    for i in range(3):
        torch.testing.assert_close(mapped[i], carafe.carafe(xs[i], m.detach(), 3, 1, 2), rtol=0, atol=0)
    both = torch.func.vmap(carafe.carafe, in_dims=(0, 0, None, None, None))(xs, torch.stack([m.detach()] * 3), 3, 1, 2)
    torch.testing.assert_close(both, mapped, rtol=0, atol=0)


def test_functorch_differentiation_raises_a_clear_error():
    x, m, _ = _inputs(3, 1, 2, True)
    with pytest.raises(RuntimeError, match="do not support torch.func.grad.*use torch.autograd.grad"):
        torch.func.grad(lambda a: carafe.carafe(a, m.detach(), 3, 1, 2).sum())(x.detach())


def _modules():
    torch.manual_seed(0)
    return {"up": CARAFEPack(16, 2, up_group=2).eval(), "down": CARAFEDownPack(16, 2, down_kernel=3).eval()}


@pytest.mark.parametrize("direction", ["up", "down"])
def test_compile_fullgraph_matches_eager_forward_and_backward(direction):
    torch._dynamo.reset()
    module = _modules()[direction]
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
@pytest.mark.parametrize("direction", ["up", "down"])
def test_export_with_dynamic_height_and_width(direction, strict):
    module = _modules()[direction]
    # torch's contiguity checks guard a 1-pixel output, so a downsampler's dynamic sizes start at 3.
    low = 2 if direction == "up" else 3
    dims = {2: torch.export.Dim("h", min=low, max=256), 3: torch.export.Dim("w", min=low, max=256)}
    program = torch.export.export(module, (torch.randn(2, 16, 9, 7),), dynamic_shapes=(dims,), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert f"carafe.{'carafe' if direction == 'up' else 'carafe_down'}.default" in targets
    for shape in [(2, 16, 9, 7), (2, 16, 4, 13)]:
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), module(x), rtol=1e-6, atol=1e-6)


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


def test_flop_counter_counts_the_backward_ops():
    x, m, _ = _inputs(5, 1, 2, True)
    with FlopCounterMode(display=False) as counter:
        carafe.carafe(x, m, 5, 1, 2).sum().backward()
    assert counter.get_total_flops() == 3 * reassembly_flops(x.shape, 5, 2, up=True)


# --- ONNX --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("k,g,s", [(5, 1, 2), (3, 2, 3), (1, 4, 1), (7, 2, 4)])
def test_standard_op_decomposition_matches_the_reference(up, k, g, s):
    for h, w in [(5, 6), (1, 1), (4, 7)]:
        x, m, _ = _inputs(k, g, s, up, c=8, h=h, w=w)
        m = m.detach().clone()
        m[:, 0] = float("nan")  # tap (0, 0) lies outside the map for the top-left outputs: must contribute zero
        with use_backend("reference"):
            expected = (carafe.carafe if up else carafe.carafe_down)(x.detach(), m, k, g, s)
        got = reassemble_standard_ops(x.detach(), m, k, g, s, up)
        inside = ~torch.isnan(expected)
        assert torch.equal(inside, ~torch.isnan(got))
        torch.testing.assert_close(got[inside], expected[inside], rtol=1e-12, atol=1e-12)


class _SmallModel(torch.nn.Module):
    """A downsampler, a conv and an upsampler back to the input size: both ops in one exported graph."""

    def __init__(self) -> None:
        super().__init__()
        self.down = CARAFEDownPack(8, 2, down_kernel=3)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = CARAFEPack(8, 2, up_group=2, up_kernel=3, compressed_channels=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.conv(self.down(x))))


def _onnx_bytes(module, x, dynamo):
    if dynamo:
        dims = {2: torch.export.Dim("h", min=4, max=256), 3: torch.export.Dim("w", min=4, max=256)}
        return torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=(dims,),
                                 verbose=False).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    return buffer.getvalue()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("which", ["up", "down", "model"])
def test_onnx_export_runs_in_onnxruntime(which, dynamo):
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    torch.manual_seed(0)
    module = _SmallModel().eval() if which == "model" else _modules()[which]
    channels = 8 if which == "model" else 16
    data = _onnx_bytes(module, torch.randn(1, channels, 12, 10), dynamo)
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    assert ops, "empty graph"
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load_from_string(data).graph.node), ops
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for shape in [(1, channels, 12, 10), (2, channels, 8, 14)] if not dynamo else [(1, channels, 12, 10),
                                                                                   (1, channels, 8, 14)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        expected = module(x).detach().numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
