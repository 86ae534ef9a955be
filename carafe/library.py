"""The reassembly as PyTorch operators, registered with the dispatcher through ``torch.library``.

Six operators, three per direction (``carafe`` upsamples, ``carafe_down`` is CARAFE++'s downsampling)::

    carafe::carafe(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor
    carafe::carafe_backward_features(Tensor grad_out, Tensor features, Tensor masks, int kernel_size,
                                     int group_size, int scale_factor) -> Tensor      # d loss / d features
    carafe::carafe_backward_masks(...same arguments...) -> Tensor                     # d loss / d masks
    carafe::carafe_down, carafe::carafe_down_backward_features, carafe::carafe_down_backward_masks

Each has one kernel for every device, which runs the backend that ``carafe.use_backend`` selects (the compiled CPU
and CUDA kernels, or the pure-PyTorch reference) when the call executes; a fake implementation (shapes and layouts
only), so FakeTensor, the meta device, ``torch.compile`` and ``torch.export`` trace them without running a kernel;
autograd through the backward operators, computing only the gradients asked for, twice differentiable (the
reassembly is bilinear, so the backward operators' gradients are the three operators again); a ``vmap`` rule (the
mapped dimension joins the batch); and a FLOP formula for ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs).
The backward operators take both inputs: ``backward_features`` reads the masks and only the shape and layout of the
features, ``backward_masks`` the features and only the shape and layout of the masks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from carafe.backends import select
from carafe.backends.function import KERNELS, check_op_tensors, memory_format_of, result_layout

NAMESPACE = "carafe"
DIRECTIONS = {"carafe": True, "carafe_down": False}  # op name -> up


def op_name(direction: str, kernel: str) -> str:
    """``carafe`` / ``carafe_down`` followed by ``_backward_features`` / ``_backward_masks`` for the gradients."""
    return direction if kernel == "forward" else f"{direction}_{kernel}"


def reassembly_flops(features_shape: tuple[int, ...] | torch.Size, kernel_size: int, scale_factor: int,
                     up: bool) -> int:
    """FLOPs of one reassembly forward with the papers' convention (a multiply-add counts 2): 2 * k^2 * C per output
    pixel, for every output pixel. Each of the two backward kernels costs the same."""
    n, c, h, w = features_shape
    out_h, out_w = (h * scale_factor, w * scale_factor) if up else ((h - 1) // scale_factor + 1, (w - 1) // scale_factor + 1)
    return 2 * kernel_size * kernel_size * c * n * out_h * out_w


def _fake(kernel: str) -> Callable[..., Tensor]:
    def fake(*args: object) -> Tensor:
        grad_out, features, masks = (None, *args[:2]) if kernel == "forward" else args[:3]
        shape, layout_of = result_layout(kernel, features, masks, grad_out)
        return torch.empty(shape, dtype=features.dtype, device=features.device,
                           memory_format=memory_format_of(layout_of))

    return fake


def _vmap(op: Callable[..., Tensor], tensor_args: int) -> Callable[..., tuple[Tensor, int]]:
    """A vmap rule: every tensor argument shares the batch dimension N, so the mapped dimension B folds into it
    ((B, N, ...) -> (B * N, ...)), unmapped arguments are expanded to B, and the result unfolds again."""

    def rule(info, in_dims, *args):  # noqa: ANN001, ANN202 -- torch.library's vmap signature
        size = info.batch_size
        tensors = []
        for t, dim in zip(args[:tensor_args], in_dims[:tensor_args]):
            t = t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            tensors.append(t.reshape(size * t.shape[1], *t.shape[2:]))
        out = op(*tensors, *args[tensor_args:])
        return out.reshape(size, -1, *out.shape[1:]), 0

    return rule


def _dynamo_disabled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` hidden from TorchDynamo, as ``torch.library.custom_op`` hides an implementation, but without importing
    ``torch._dynamo`` (several seconds) on the first eager call: until something has imported it, nothing can be
    compiling, and ``fn`` runs as it is."""
    disabled: list[Callable[..., Tensor]] = []

    def call(*args: object) -> Tensor:
        if "torch._dynamo" not in sys.modules:
            return fn(*args)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args)

    return call


def _define(direction: str, up: bool) -> dict[str, torch._ops.OpOverload]:
    ops = {}
    for kernel in KERNELS:
        # One implementation for every device: the backend is chosen from the tensors and use_backend at run time.
        def impl(*args: object, kernel: str = kernel) -> Tensor:
            grad_out, features, masks = (None, *args[:2]) if kernel == "forward" else args[:3]
            k, g, s = args[-3:]
            check_op_tensors(f"torch.ops.{NAMESPACE}.{op_name(direction, kernel)}", kernel, grad_out, features, masks,
                             k, g, s, up)
            return select(features).compute(kernel, features, masks, grad_out, k, g, s, up)

        schema = ("(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor"
                  if kernel == "forward" else "(Tensor grad_out, Tensor features, Tensor masks, int kernel_size, "
                  "int group_size, int scale_factor) -> Tensor")
        name = f"{NAMESPACE}::{op_name(direction, kernel)}"
        # torch.library's define / impl rather than custom_op, whose implementations import torch._dynamo on their
        # first call (see _dynamo_disabled); the fake, autograd and vmap registrations are the same ones.
        torch.library.define(name, schema, tags=(torch.Tag.pt2_compliant_tag,))
        torch.library.impl(name, "CompositeExplicitAutograd", _dynamo_disabled(impl))
        op = getattr(getattr(torch.ops, NAMESPACE), op_name(direction, kernel)).default
        torch.library.register_fake(name, _fake(kernel))
        torch.library.register_vmap(name, _vmap(op, 2 if kernel == "forward" else 3))
        ops[kernel] = op

        @register_flop_formula(getattr(getattr(torch.ops, NAMESPACE), op_name(direction, kernel)))
        def flops(*args: object, out_shape: tuple[int, ...] | None = None, **kwargs: object) -> int:
            features_shape = args[0] if len(args) == 5 else args[1]
            k, _, s = args[-3:]
            return reassembly_flops(features_shape, k, s, up)

    forward, backward_features, backward_masks = ops["forward"], ops["backward_features"], ops["backward_masks"]

    def save_inputs(ctx, inputs: tuple, output: Tensor) -> None:  # noqa: ANN001
        *tensors, k, g, s = inputs
        ctx.save_for_backward(*tensors)
        ctx.geometry = (k, g, s)

    # The reassembly is bilinear: with out = R(x, m), backward_features(g) = R_x^T g and backward_masks(g) = R_m^T g,
    # and the gradients of those are R, R_x^T and R_m^T again (see the module docstring).
    def forward_backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        features, masks = ctx.saved_tensors
        need_features, need_masks = ctx.needs_input_grad[:2]
        return (backward_features(grad, features, masks, *ctx.geometry) if need_features else None,
                backward_masks(grad, features, masks, *ctx.geometry) if need_masks else None, None, None, None)

    def backward_features_backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        # out = R_x^T(g; m): linear in g (its gradient is R(grad, m)) and in m (R_m^T(g; grad)); features: shape only.
        grad_out, features, masks = ctx.saved_tensors
        need_grad_out, _, need_masks = ctx.needs_input_grad[:3]
        return (forward(grad, masks, *ctx.geometry) if need_grad_out else None, None,
                backward_masks(grad_out, grad, masks, *ctx.geometry) if need_masks else None, None, None, None)

    def backward_masks_backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001
        # out = R_m^T(g; x): linear in g (its gradient is R(x, grad)) and in x (R_x^T(g; grad)); masks: shape only.
        grad_out, features, masks = ctx.saved_tensors
        need_grad_out, need_features, _ = ctx.needs_input_grad[:3]
        return (forward(features, grad, *ctx.geometry) if need_grad_out else None,
                backward_features(grad_out, features, grad, *ctx.geometry) if need_features else None, None,
                None, None, None)

    for op, backward in ((forward, forward_backward), (backward_features, backward_features_backward),
                         (backward_masks, backward_masks_backward)):
        torch.library.register_autograd(op._schema.name, backward, setup_context=save_inputs)
    return ops


OPS = {direction: _define(direction, up) for direction, up in DIRECTIONS.items()}
