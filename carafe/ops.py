"""``carafe`` (upsampling) and ``carafe_down`` (CARAFE++ downsampling): input checks, then the registered operator
(``torch.ops.carafe.carafe`` / ``carafe_down``, see ``carafe.library``), which runs the selected backend."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from carafe.decomposition import reassemble_standard_ops
from carafe.library import OPS


#: The largest integer the operators' ``int`` arguments carry (the dispatcher's ``int`` is a signed 64-bit one).
INT64_MAX = 2**63 - 1
#: The dtypes every backend computes in (the compiled CPU kernels take float32 and float64; the reference and CUDA
#: backends the four). Other floating-point dtypes (float8 variants) have no arithmetic to reassemble with.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, minimum: int, maximum: int = INT64_MAX) -> int:
    """``value`` as an int; ``TypeError`` if it is not an integer (bools are not), ``ValueError`` if below
    ``minimum`` or above ``maximum`` (by default the largest signed 64-bit integer, the most the operators can
    carry); the messages name ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}" + (" (2**63 - 1, the largest a signed 64-bit integer holds)"
                         if maximum == INT64_MAX else "") + f", got {value}")
    return int(value)


def check_odd(name: str, value: object) -> int:
    """``value`` as an int if it is an odd integer >= 1 (a kernel size with a centre), else a named error."""
    value = check_int(name, value, 1)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with .to_dense()")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}, which the reassembly does not support; use one of "
                        f"{', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)} (e.g. .float())")
    return t


def check_inputs(features: object, masks: object, kernel_size: object, group_size: object, scale_factor: object,
                 up: bool) -> tuple[int, int, int]:
    """Validate the arguments of carafe / carafe_down; return (kernel_size, group_size, scale_factor) as ints."""
    features = _check_tensor("features", features)
    masks = _check_tensor("masks", masks)
    k = check_odd("kernel_size", kernel_size)
    g = check_int("group_size", group_size, 1)
    s = check_int("scale_factor", scale_factor, 1)
    if masks.dtype != features.dtype:
        raise TypeError(f"masks dtype {masks.dtype} does not match features dtype {features.dtype}")
    if masks.device != features.device:
        raise ValueError(f"masks are on {masks.device} but features are on {features.device}")
    n, c, h, w = features.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"features must have C, H, W >= 1, got shape (N, C, H, W) = {tuple(features.shape)}: "
                         "an empty feature map has nothing to reassemble (N = 0, an empty batch, is allowed)")
    if masks.shape[0] != n:
        raise ValueError(f"masks must have the batch size N = {n} of features, got N = {masks.shape[0]} "
                         f"(masks of shape {tuple(masks.shape)}, features of shape {tuple(features.shape)})")
    if c % g != 0:
        raise ValueError(f"the number of channels ({c}) must be divisible by group_size ({g})")
    # (h - 1) // s + 1 is ceil(h / s) written as a stride-s convolution computes it, so traced shapes match.
    out_hw = (h * s, w * s) if up else ((h - 1) // s + 1, (w - 1) // s + 1)
    expected = (n, g * k * k, *out_hw)
    if tuple(masks.shape) != expected:
        spatial = "H * scale_factor, W * scale_factor" if up else "ceil(H / scale_factor), ceil(W / scale_factor)"
        wrong = "its channels" if masks.shape[1] != expected[1] else "its height and width"
        raise ValueError(f"masks must have shape (N, group_size * kernel_size**2, {spatial}) = {expected} for "
                         f"features of shape {tuple(features.shape)}, kernel_size={k}, group_size={g}, "
                         f"scale_factor={s}; got {tuple(masks.shape)} ({wrong} differ)")
    return k, g, s


def _reassemble(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int,
                up: bool) -> Tensor:
    """The registered operator, or its standard-op decomposition while ``torch.onnx.export`` traces the call."""
    if torch.onnx.is_in_onnx_export():
        return reassemble_standard_ops(features, masks, kernel_size, group_size, scale_factor, up)
    if not torch.compiler.is_compiling():
        _refuse_functorch_differentiation()
    return OPS["carafe" if up else "carafe_down"]["forward"](features, masks, kernel_size, group_size, scale_factor)


def _refuse_functorch_differentiation() -> None:
    # torch.library's autograd registration is not visible to torch.func's differentiation transforms; without this
    # check they fail with a message about autograd.Function internals.
    for interpreter in retrieve_all_functorch_interpreters():
        if interpreter.key() in (TransformType.Grad, TransformType.Jvp):
            raise RuntimeError(
                "carafe / carafe_down do not support torch.func.grad, vjp, jacrev, jvp or jacfwd (its gradients are "
                "registered for torch.autograd); use torch.autograd.grad or .backward() instead. torch.func.vmap "
                "works.")


def carafe(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int) -> Tensor:
    """Content-aware upsampling (CARAFE); the same contract as ``mmcv.ops.carafe``.

    ``out[n, c, p, q] = sum_{ky, kx} features[n, c, p // s + ky - r, q // s + kx - r] * masks[n, g*k*k + ky*k + kx, p, q]``
    with ``r = k // 2``, ``s = scale_factor`` and ``g = c // (C / group_size)``; taps outside the map contribute zero.

    Args:
        features: Tensor[N, C, H, W], floating point.
        masks: Tensor[N, group_size * kernel_size**2, H * scale_factor, W * scale_factor], the reassembly kernels
            (normally softmax-normalised over each group's k*k taps), same dtype and device as ``features``.
        kernel_size: odd reassembly kernel size k_up >= 1.
        group_size: number of channel groups sharing one kernel; must divide C.
        scale_factor: integer upsampling ratio >= 1.

    Returns:
        Tensor[N, C, H * scale_factor, W * scale_factor], differentiable w.r.t. ``features`` and ``masks``.
    """
    k, g, s = check_inputs(features, masks, kernel_size, group_size, scale_factor, up=True)
    return _reassemble(features, masks, k, g, s, up=True)


def carafe_down(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int) -> Tensor:
    """Content-aware downsampling (CARAFE++): the reassembly centre of output (i, j) is input (s*i, s*j).

    ``out[n, c, i, j] = sum_{ky, kx} features[n, c, s*i + ky - r, s*j + kx - r] * masks[n, g*k*k + ky*k + kx, i, j]``,
    i.e. the sampling grid of a stride-s convolution with padding k // 2; taps outside the map contribute zero.

    Args:
        features: Tensor[N, C, H, W], floating point.
        masks: Tensor[N, group_size * kernel_size**2, ceil(H / scale_factor), ceil(W / scale_factor)].
        kernel_size: odd reassembly kernel size k_up >= 1.
        group_size: number of channel groups sharing one kernel; must divide C.
        scale_factor: integer downsampling ratio >= 1.

    Returns:
        Tensor[N, C, ceil(H / scale_factor), ceil(W / scale_factor)], differentiable w.r.t. both inputs.
    """
    k, g, s = check_inputs(features, masks, kernel_size, group_size, scale_factor, up=False)
    return _reassemble(features, masks, k, g, s, up=False)
