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


def check_op_tensors(op: str, kernel: str, grad_out: object, features: object, masks: object, kernel_size: int,
                     group_size: int, scale_factor: int, up: bool) -> None:
    """What every registered operator checks before a backend (and so a compiled kernel, which reads raw
    pointers) sees its tensors: types, dtypes, devices and shapes all agree with the geometry. ``TypeError`` /
    ``ValueError`` naming ``op`` and the argument. The public ``carafe`` / ``carafe_down`` check the same before
    calling the forward operator; this also covers the backward operators and direct ``torch.ops.carafe`` calls."""
    named = [("features", features), ("masks", masks)] + ([] if kernel == "forward" else [("grad_out", grad_out)])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating-point dtype, got {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != features.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but features have {features.dtype}; all tensors of "
                            "the op must share one dtype")
        if t.device != features.device:
            raise ValueError(f"{op}: {name} is on {t.device} but features are on {features.device}")
    for name, value in (("kernel_size", kernel_size), ("group_size", group_size), ("scale_factor", scale_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be an integer >= 1, got {value!r}")
    if kernel_size % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be odd, got {kernel_size}")
    n, c, h, w = features.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"{op}: features must have C, H, W >= 1, got shape {tuple(features.shape)}")
    if c % group_size != 0:
        raise ValueError(f"{op}: the number of channels ({c}) must be divisible by group_size ({group_size})")
    s = scale_factor
    out_hw = (h * s, w * s) if up else ((h - 1) // s + 1, (w - 1) // s + 1)
    expected = {"masks": (n, group_size * kernel_size ** 2, *out_hw), "grad_out": (n, c, *out_hw)}
    for name, t in named[1:]:
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{op}: {name} must have shape {expected[name]} for features of shape "
                             f"{tuple(features.shape)}, kernel_size={kernel_size}, group_size={group_size}, "
                             f"scale_factor={scale_factor}; got {tuple(t.shape)}")
