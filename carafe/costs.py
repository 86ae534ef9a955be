"""Exact cost accounting of the upsampler / downsampler zoo: parameters and FLOPs per input pixel.

Convention (the papers'; ICCV Table 2 and the CARAFE formula, which follows Molchanov et al. [28]):

* a multiply-add counts 2 FLOPs. A convolution costs ``2 * (C_in / groups * k^2 + 1) * C_out`` per output pixel;
  the ``+ 1`` is the bias, counted as one more multiply-add (the ``(C_in + 1)`` of the CARAFE formula); a conv
  without bias drops it. A transposed convolution costs ``2 * C_in * k^2 * C_out / groups`` per *input* pixel
  plus its bias at every output element.
* weighted sums that are not convolutions count one multiply-add per tap and output element: the reassembly
  (``2 k_up^2 C`` per output pixel), bilinear interpolation and bilinear grid sampling (4 taps: 8 FLOPs), average
  pooling (``2 k^2``).
* a lone elementwise add, subtract, multiply or divide between two tensors counts 1 FLOP per output element (S.A.'s
  rescaling, which Table 2's 28k needs); a sum over a dimension counts one add per reduced element.
* copies, index shuffles and comparisons (nearest, pixel shuffle, max pooling) and nonlinearities or
  normalisations (ReLU, sigmoid, exp, powers, softmax, BatchNorm / InstanceNorm) count 0: the CARAFE formula leaves
  its softmax out and S.A.'s 28k leaves its sigmoid out.

"Per pixel" is per pixel of the operator's *input*: the low-resolution map for upsamplers (as Table 2), the
high-resolution map for downsamplers (the papers print no downsampler cost; per input pixel keeps both directions on
the same footing: the cost of processing a map of a given size). A stride-sigma stage then costs its
per-output-pixel work divided by sigma^2, which can be fractional; values are returned as ``int`` when whole and as
``float`` otherwise. Per-input-pixel figures assume H and W divisible by sigma (otherwise borders add the
ceil(H / sigma) rounding).

``count_flops`` applies the same rules to the aten operations a module actually executes (a dispatch mode), so a test
can check every analytic formula against a count taken while running the module. Its convolution term equals
``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add, no bias) plus the bias term.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from carafe.modules import CARAFEDownPack, CARAFEPack

Number = int | float


def as_number(value: Fraction | int) -> Number:
    """``int`` when whole, ``float`` otherwise."""
    value = Fraction(value)
    return int(value) if value.denominator == 1 else float(value)


def conv_flops(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, groups: int = 1) -> int:
    """FLOPs of one conv per output pixel: ``2 * (C_in / groups * k^2 + bias) * C_out``."""
    return 2 * (in_channels // groups * kernel_size * kernel_size + int(bias)) * out_channels


def num_params(module: nn.Module) -> int:
    """Learnable parameters (buffers such as BatchNorm statistics are not parameters)."""
    return sum(p.numel() for p in module.parameters())


def _compressor_flops(m: CARAFEPack | CARAFEDownPack) -> tuple[int, int]:
    """FLOPs per input pixel of the 1x1 channel compressor (0 without one) and the content encoder's input channels."""
    if m.compressed_channels is None:
        return 0, m.channels
    return conv_flops(m.channels, m.compressed_channels, 1), m.compressed_channels


def _carafe_up_flops(m: CARAFEPack) -> Fraction:
    """ICCV 2019, Sec. 3.3: 2(C+1)C_m + 2(C_m k_enc^2 + 1) sigma^2 G k_up^2 + 2 sigma^2 k_up^2 C per input pixel."""
    s2, taps = m.scale_factor ** 2, m.kernel_size ** 2
    compressor, encoder_in = _compressor_flops(m)
    encoder = conv_flops(encoder_in, s2 * m.group_size * taps, m.encoder_kernel)
    reassembly = 2 * s2 * taps * m.channels
    return Fraction(compressor + encoder + reassembly + _normalizer_flops(m) * s2)


def _carafe_down_flops(m: CARAFEDownPack) -> Fraction:
    """CARAFE++: the compressor at input resolution, the stride-sigma encoder and the reassembly per output pixel."""
    s2, taps = m.scale_factor ** 2, m.kernel_size ** 2
    compressor, encoder_in = _compressor_flops(m)
    per_output = conv_flops(encoder_in, m.group_size * taps, m.encoder_kernel) + 2 * taps * m.channels
    return compressor + Fraction(per_output + _normalizer_flops(m), s2)


def _normalizer_flops(m: CARAFEPack | CARAFEDownPack) -> int:
    """Per output pixel: softmax and sigmoid are nonlinearities (0, as the paper's formula); ``sigmoid_normalized``
    adds a sum of the k^2 taps and k^2 divisions per group."""
    if m.normalizer != "sigmoid_normalized":
        return 0
    taps = m.kernel_size ** 2
    return m.group_size * (2 * taps - 1)


_FORMULAS: dict[type, Callable[[nn.Module], Fraction]] = {
    CARAFEPack: _carafe_up_flops,
    CARAFEDownPack: _carafe_down_flops,
}


def flops_per_pixel(module: nn.Module) -> Number:
    """Analytic FLOPs per input pixel of a zoo operator (see the module docstring for the convention)."""
    if hasattr(module, "flops_per_pixel"):
        return as_number(module.flops_per_pixel())
    for cls in type(module).__mro__:
        if cls in _FORMULAS:
            return as_number(_FORMULAS[cls](module))
    raise TypeError(f"no FLOPs formula for {type(module).__name__}; zoo operators define flops_per_pixel()")


# ---- Table 2's rounding -------------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 1_000, "M": 1_000_000, "G": 1_000_000_000}


def paper_round(value: Number, like: str | None = None) -> str:
    """``value`` printed as Table 2 prints costs.

    With ``like`` (a figure as the paper prints it, e.g. ``"2.3k"``), use that figure's unit and number of decimals,
    so ``paper_round(x, like=p) == p`` says that x rounds to the published p. Without it: 0 -> ``"0"``, millions with
    one decimal (``4.7M``), thousands as whole k (``199k``), below 10k one decimal (``2.3k``), dropping a ``.0``.
    """
    if like is not None:
        match = re.fullmatch(r"(\d+)(?:\.(\d+))?([kMG]?)", like.strip())
        if match is None:
            raise ValueError(f"cannot read the printed figure {like!r}")
        decimals, unit = len(match.group(2) or ""), match.group(3)
        if float(like.rstrip("kMG")) == 0:
            return "0" if value == 0 else f"{value:g}"
        return f"{value / _SUFFIX[unit]:.{decimals}f}{unit}"
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        text, unit = f"{value / 1e6:.1f}", "M"
    elif abs(value) >= 1e4:
        text, unit = f"{value / 1e3:.0f}", "k"
    elif abs(value) >= 1e3:
        text, unit = f"{value / 1e3:.1f}", "k"
    else:
        return f"{value:g}"
    return (text[:-2] if text.endswith(".0") else text) + unit


# ---- counting FLOPs while running a module ------------------------------------------------------------------------

_aten = torch.ops.aten
_ELEMENTWISE = {_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor}


def _is_tensor(a: object) -> bool:
    return isinstance(a, Tensor) and a.dim() > 0


class FlopCount(TorchDispatchMode):
    """Count FLOPs of the aten operations run inside the block with this module's rules.

    ``total`` is the sum; ``by_op`` the split by aten operation; ``conv_macs2`` the convolution term without bias
    (what ``FlopCounterMode`` reports for the same convolutions).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: dict[str, int] = {}
        self.conv_macs2 = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _add(self, func: object, flops: int) -> None:
        if flops:
            key = str(func)
            self.by_op[key] = self.by_op.get(key, 0) + int(flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _aten.convolution.default:
            x, w, bias, _, _, _, transposed, _, groups = args[:9]
            if transposed:  # weight (C_in, C_out / groups, kh, kw); every input pixel meets the whole kernel
                macs = x.numel() * w.shape[1] * math.prod(w.shape[2:])
            else:  # weight (C_out, C_in / groups, kh, kw)
                macs = out.numel() * w.shape[1] * math.prod(w.shape[2:])
            self.conv_macs2 += 2 * macs
            self._add(func, 2 * macs + (2 * out.numel() if bias is not None else 0))
        elif func in (_aten.upsample_bilinear2d.vec, _aten.upsample_bilinear2d.default, _aten.grid_sampler_2d.default):
            self._add(func, 8 * out.numel())
        elif func is _aten.avg_pool2d.default:
            kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
            kernel = list(kernel) * (2 // len(kernel))
            self._add(func, 2 * math.prod(kernel) * out.numel())
        elif func in _ELEMENTWISE and len(args) >= 2 and _is_tensor(args[0]) and _is_tensor(args[1]):
            self._add(func, out.numel())
        elif func is _aten.sum.dim_IntList:
            self._add(func, args[0].numel() - out.numel())
        elif func.namespace == "carafe":  # the registered reassembly ops count with their own formula (2 k^2 C)
            self._add(func, flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        return out


def count_flops(module: nn.Module, x: Tensor) -> FlopCount:
    """Run ``module(x)`` without gradients and count its FLOPs with the rules above."""
    counter = FlopCount()
    with torch.no_grad(), counter:
        module(x)
    return counter


# ---- the paper's printed formula ----------------------------------------------------------------------------------

def carafe_paper_flops(channels: int, scale_factor: int, compressed_channels: int, encoder_kernel: int,
                       up_kernel: int) -> int:
    """The ICCV paper's printed formula: 2(C+1)C_m + 2(C_m k_enc^2 + 1) sigma^2 k_up^2 + 2 sigma^2 k_up^2 C."""
    s2, taps = scale_factor ** 2, up_kernel ** 2
    return (2 * (channels + 1) * compressed_channels + 2 * (compressed_channels * encoder_kernel ** 2 + 1) * s2 * taps
            + 2 * s2 * taps * channels)
