"""The autograd Function shared by the compiled backends (cpu, cuda).

A backend supplies ``run(kernel, a, b, shape, layout_of, geometry) -> Tensor``: it runs kernel ``forward``
(a = features, b = masks), ``backward_features`` (a = grad_out, b = masks) or ``backward_masks`` (a = grad_out,
b = features) and returns a new tensor of ``shape`` in the memory layout of ``layout_of`` (channels_last results for
channels_last inputs). Only the gradients autograd asks for are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

KernelRunner = Callable[[str, Tensor, Tensor, tuple, Tensor, tuple], Tensor]


def storage_problem(t: Tensor) -> str | None:
    """None if ``t`` owns real memory a compiled kernel may read through ``data_ptr()``, else what it is instead.

    Fake tensors (FakeTensorMode, torch.compile / export tracing), meta tensors, functional tensors and functorch
    wrappers (vmap, grad) have no memory behind ``data_ptr()``; a kernel given one would read or write address 0.
    """
    if is_fake(t):
        return "a FakeTensor (tracing under FakeTensorMode, torch.compile or torch.export)"
    if t.device.type == "meta":
        return "a meta tensor"
    if torch._is_functional_tensor(t):
        return "a functional tensor (functionalization)"
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return "a functorch-wrapped tensor (torch.func.vmap / grad)"
    return None


def kernel_unavailable_reason(t: Tensor) -> str | None:
    """A compiled backend's ``unavailable_reason`` for a tensor without real storage, None for one with it."""
    problem = storage_problem(t)
    return None if problem is None else f"its compiled kernels need tensors with real memory, got {problem}"


def check_storage(t: Tensor, what: str) -> None:
    """Raise instead of handing a tensor without real storage (see ``storage_problem``) to a compiled kernel."""
    problem = storage_problem(t)
    if problem is not None:
        raise RuntimeError(f"the compiled CARAFE kernels need tensors with real memory, but {what} is {problem}; "
                           "call carafe.carafe / carafe.carafe_down, which trace such tensors without a kernel")


def kernel_operand(t: Tensor) -> Tensor:
    """``t`` with its negative / conjugate bits applied: kernels read raw memory and would ignore a lazy sign flip
    (``torch._neg_view``, views that ``torch.neg`` / ``torch.conj`` produce)."""
    return t.resolve_neg().resolve_conj()


def is_channels_last(t: Tensor) -> bool:
    """True only for tensors whose memory is channels_last and not also plain contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def reassemble_function(run: KernelRunner) -> type[torch.autograd.Function]:
    """An autograd Function computing the reassembly and its analytic gradients with ``run``."""

    class Reassemble(torch.autograd.Function):
        @staticmethod
        def forward(ctx, features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int,
                    up: bool) -> Tensor:
            n, c, h, w = features.shape
            out_h, out_w = masks.shape[-2:]
            ctx.geometry = (n, c, h, w, out_h, out_w, kernel_size, group_size, scale_factor, int(up))
            # The inputs themselves are saved, not layout-converted copies, so autograd keeps no extra memory alive.
            ctx.save_for_backward(features, masks)
            return run("forward", features, masks, (n, c, out_h, out_w), features, ctx.geometry)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out: Tensor):
            features, masks = ctx.saved_tensors
            grad_features = grad_masks = None
            if ctx.needs_input_grad[0]:
                grad_features = run("backward_features", grad_out, masks, tuple(features.shape), features,
                                    ctx.geometry)
            if ctx.needs_input_grad[1]:
                grad_masks = run("backward_masks", grad_out, features, tuple(masks.shape), masks, ctx.geometry)
            return grad_features, grad_masks, None, None, None, None

    return Reassemble
