"""What the compiled backends (cpu, cuda) share: how a kernel is called, and the guards in front of it.

A backend supplies ``run(kernel, a, b, shape, layout_of, geometry) -> Tensor``: it runs kernel ``forward``
(a = features, b = masks), ``backward_features`` (a = grad_out, b = masks) or ``backward_masks`` (a = grad_out,
b = features) and returns a new tensor of ``shape`` in the memory layout of ``layout_of`` (channels_last results for
channels_last inputs). Autograd lives in ``carafe.library``, which calls the kernels through the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

KernelRunner = Callable[[str, Tensor, Tensor, tuple, Tensor, tuple], Tensor]
KERNELS = ("forward", "backward_features", "backward_masks")


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


def result_layout(kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None
                  ) -> tuple[tuple[int, ...], Tensor]:
    """The shape of ``kernel``'s result and the input whose memory layout it takes (a channels_last result for a
    channels_last input): the output takes the features' layout, each gradient its input's."""
    if kernel == "forward":
        return (features.shape[0], features.shape[1], masks.shape[2], masks.shape[3]), features
    if kernel == "backward_features":
        return tuple(features.shape), features
    if kernel == "backward_masks":
        return tuple(masks.shape), masks
    raise ValueError(f"unknown reassembly kernel {kernel!r}; expected one of {KERNELS}")


def memory_format_of(t: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def run_kernel(run: KernelRunner, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None,
               kernel_size: int, group_size: int, scale_factor: int, up: bool) -> Tensor:
    """A compiled backend's ``compute``: ``kernel`` through ``run`` with the operands and geometry it expects."""
    n, c, h, w = features.shape
    out_h, out_w = masks.shape[-2:]
    geometry = (n, c, h, w, out_h, out_w, kernel_size, group_size, scale_factor, int(up))
    shape, layout_of = result_layout(kernel, features, masks, grad_out)
    a, b = {"forward": (features, masks), "backward_features": (grad_out, masks),
            "backward_masks": (grad_out, features)}[kernel]
    return run(kernel, a, b, shape, layout_of, geometry)
