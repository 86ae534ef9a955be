"""The downsamplers CARAFE++ is compared with (CARAFE++ Table III), and their factory.

Every operator maps Tensor[N, C, H, W] to Tensor[N, C, ceil(H / sigma), ceil(W / sigma)] (a k x k window centred on
input (sigma i, sigma j), padding k // 2, like ``CARAFEDownPack`` and a stride-sigma 3x3 conv), keeps the channel
count, takes plain keyword arguments ``(channels, scale_factor, **options)`` and reports ``flops_per_pixel()``:
FLOPs per *input* (high-resolution) pixel, papers' convention (see ``carafe.costs``). The papers print no
downsampler costs; per input pixel is the cost of processing a map of a given size, the same footing as Table 2.

    from carafe import build_downsampler
    down = build_downsampler("carafe", channels=256, scale_factor=2)
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carafe.costs import conv_flops
from carafe.modules import CARAFEDownPack
from carafe.ops import check_int, check_odd
from carafe.zoo import Registry


class _Downsampler(nn.Module):
    def __init__(self, channels: int, scale_factor: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, 1)
        self.scale_factor = check_int("scale_factor", scale_factor, 1)
        self.kernel_size = check_odd("kernel_size", kernel_size)  # odd: a window centred on the sampled pixel

    def _per_input(self, per_output_pixel: int) -> Fraction:
        return Fraction(per_output_pixel, self.scale_factor ** 2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale_factor={self.scale_factor}, kernel_size={self.kernel_size}"


class StridedConvDown(_Downsampler):
    """A k x k convolution C -> C with stride sigma, padding k // 2 (the ResNet bottleneck's strided 3x3, the
    baseline of CARAFE++ Table III). Costs per input pixel: 2 (9C + 1) C / sigma^2; 590k params at C = 256."""

    def __init__(self, channels: int, scale_factor: int = 2, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(channels, scale_factor, kernel_size)
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=scale_factor, padding=kernel_size // 2,
                              bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def flops_per_pixel(self) -> Fraction:
        return self._per_input(conv_flops(self.channels, self.channels, self.kernel_size, self.conv.bias is not None))


class MaxPoolDown(_Downsampler):
    """Max pooling, k x k (default 3, as the ResNet stem's, which CARAFE++ replaces), stride sigma, padding k // 2.
    Comparisons are not FLOPs: cost 0, like nearest upsampling in Table 2."""

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.scale_factor, self.kernel_size // 2)

    def flops_per_pixel(self) -> int:
        return 0


class AvgPoolDown(_Downsampler):
    """Average pooling, k x k (default 3), stride sigma, padding k // 2, averaging over the taps inside the map
    (``count_include_pad=False``). Costs: k^2 multiply-adds per output element, 2 k^2 C / sigma^2 per input pixel."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.scale_factor, self.kernel_size // 2, count_include_pad=False)

    def flops_per_pixel(self) -> Fraction:
        return self._per_input(2 * self.kernel_size ** 2 * self.channels)


class DetailPreservingPool(_Downsampler):
    """DPP, detail-preserving pooling (Saeedan, Weber, Goesele and Roth, CVPR 2018; CARAFE++ ref. [37]).

    ``out[p] = sum_q w[p, q] x[q] / sum_q w[p, q]`` over the k x k window of p, with
    ``w[p, q] = alpha + rho_lambda(x[q] - x~[p])``: pixels that differ from the local smoothed value x~ get more
    weight, which keeps details that average pooling blurs. ``x~`` is x filtered by a 3x3 filter at stride sigma
    (the paper's linearly downscaled image): fixed ``[1 2 1]^T [1 2 1] / 16`` ("Lite-DPP") or, with
    ``learn_filter=True``, a learned per-channel 3x3 filter starting there ("full DPP").
    ``rho`` is the paper's symmetric reward ``(sqrt(d^2 + eps^2))^lambda`` or, with ``asymmetric=True``, the
    asymmetric one that only rewards values above x~: ``(sqrt(max(d, 0)^2 + eps^2))^lambda``. alpha and lambda are
    learned per channel and kept non-negative (clamped at 0, as the paper constrains them); eps = 1e-3.
    Window: k x k (default 3) centred on input (sigma i, sigma j), taps outside the map excluded.

    Costs per output element: the 3x3 filter (18) + per tap a difference, the alpha addition, the product with x
    (3 k^2) + the two window sums (2 (k^2 - 1)) + the division (1): 17 + 5 k^2; per input pixel times C / sigma^2.
    The powers and square roots of rho are nonlinearities (0 FLOPs, as sigmoid and softmax elsewhere).
    """

    def __init__(self, channels: int, scale_factor: int = 2, kernel_size: int = 3, learn_filter: bool = False,
                 asymmetric: bool = False, alpha: float = 1.0, lambda_: float = 1.0, eps: float = 1e-3) -> None:
        super().__init__(channels, scale_factor, kernel_size)
        self.asymmetric = asymmetric
        self.eps = float(eps)
        smooth = torch.tensor([1.0, 2.0, 1.0])
        smooth = (smooth[:, None] * smooth[None, :] / 16).expand(channels, 1, 3, 3).clone()
        if learn_filter:
            self.smoothing = nn.Parameter(smooth)
        else:
            self.register_buffer("smoothing", smooth)
        self.alpha = nn.Parameter(torch.full((channels, 1, 1), float(alpha)))
        self.lambda_ = nn.Parameter(torch.full((channels, 1, 1), float(lambda_)))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, s, r = self.kernel_size, self.scale_factor, self.kernel_size // 2
        out_h, out_w = -(-h // s), -(-w // s)
        smoothed = F.conv2d(x, self.smoothing.to(x.dtype), stride=s, padding=1, groups=c)  # [N, C, out_h, out_w]
        taps = F.unfold(x, k, padding=r, stride=s).view(n, c, k * k, out_h, out_w)
        inside = F.unfold(x.new_ones(1, 1, h, w), k, padding=r, stride=s).view(1, 1, k * k, out_h, out_w) > 0
        diff = taps - smoothed.unsqueeze(2)
        if self.asymmetric:
            diff = diff.clamp(min=0)
        lam = self.lambda_.clamp(min=0).unsqueeze(1)
        reward = (diff.pow(2) + self.eps ** 2).pow(lam / 2)
        weights = torch.where(inside, self.alpha.clamp(min=0).unsqueeze(1) + reward, 0)
        return (weights * taps).sum(dim=2) / weights.sum(dim=2)

    def flops_per_pixel(self) -> Fraction:
        taps = self.kernel_size ** 2
        return self._per_input((17 + 5 * taps) * self.channels)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, learn_filter={isinstance(self.smoothing, nn.Parameter)}, "
                f"asymmetric={self.asymmetric}")


class LocalImportancePool(_Downsampler):
    """LIP, local importance-based pooling (Gao, Wang and Wu, ICCV 2019; CARAFE++ ref. [9]).

    ``out = avgpool(x * exp(logit)) / avgpool(exp(logit))`` over a k x k window (default 3, stride sigma, padding
    k // 2), where the importance logits come from a small fully convolutional network on x, bounded by the LIP
    paper's soft gate ``12 * sigmoid``. Variants (the LIP paper's):
    ``"simplified"`` (default; LIP-ResNet's stem): 3x3 conv C -> C without bias, affine InstanceNorm, gate.
    ``"bottleneck"`` (LIP-ResNet's stages): 1x1 conv C -> h, IN, ReLU, 3x3 conv h -> h, IN, ReLU, 1x1 conv h -> C, IN,
    gate, with h = ``hidden_channels`` (default C // 2).
    Costs per input pixel: the logit convs (no bias) + x * importance (C) + the two average pools and the division
    ((2 * 2 k^2 + 1) C / sigma^2); exp, gate and normalisation are nonlinearities (0).
    """

    VARIANTS = ("simplified", "bottleneck")
    GATE = 12.0

    def __init__(self, channels: int, scale_factor: int = 2, kernel_size: int = 3, variant: str = "simplified",
                 hidden_channels: int | None = None) -> None:
        super().__init__(channels, scale_factor, kernel_size)
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown LIP variant {variant!r}; choose one of {', '.join(self.VARIANTS)}")
        self.variant = variant
        if variant == "simplified":
            self.hidden_channels = None
            self.logit = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                       nn.InstanceNorm2d(channels, affine=True))
        else:
            hidden = max(channels // 2, 1) if hidden_channels is None else check_int("hidden_channels",
                                                                                     hidden_channels, 1)
            self.hidden_channels = hidden
            self.logit = nn.Sequential(
                nn.Conv2d(channels, hidden, 1, bias=False), nn.InstanceNorm2d(hidden, affine=True), nn.ReLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.InstanceNorm2d(hidden, affine=True), nn.ReLU(),
                nn.Conv2d(hidden, channels, 1, bias=False), nn.InstanceNorm2d(channels, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        importance = torch.exp(self.GATE * torch.sigmoid(self.logit(x)))
        k, s = self.kernel_size, self.scale_factor
        return (F.avg_pool2d(x * importance, k, s, k // 2) / F.avg_pool2d(importance, k, s, k // 2))

    def flops_per_pixel(self) -> Fraction:
        c = self.channels
        if self.variant == "simplified":
            logit = conv_flops(c, c, 3, bias=False)
        else:
            h = self.hidden_channels
            logit = conv_flops(c, h, 1, bias=False) + conv_flops(h, h, 3, bias=False) + conv_flops(h, c, 1, bias=False)
        return logit + c + self._per_input((4 * self.kernel_size ** 2 + 1) * c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}"


DOWNSAMPLERS = Registry("downsampler", {
    "strided_conv": (StridedConvDown, {}),
    "max_pool": (MaxPoolDown, {}),
    "avg_pool": (AvgPoolDown, {}),
    "dpp": (DetailPreservingPool, {}),
    "lip": (LocalImportancePool, {}),
    "carafe": (CARAFEDownPack, {}),
})


def build_downsampler(spec: object, channels: int, scale_factor: int = 2, **options: object) -> nn.Module:
    """Build a downsampler Tensor[N, C, H, W] -> Tensor[N, C, ceil(H / sigma), ceil(W / sigma)].

    ``spec`` is a name (``DOWNSAMPLERS.names``; ``"carafe"`` is CARAFE++), a mapping with ``type`` or ``name`` plus
    options, a class, or a callable (``functools.partial``, a Hydra ``_partial_`` object) called with ``channels``
    and ``scale_factor``. Keyword ``options`` override the ones in ``spec``.
    """
    return DOWNSAMPLERS.build(spec, channels=channels, scale_factor=scale_factor, **options)


__all__ = ["AvgPoolDown", "DOWNSAMPLERS", "DetailPreservingPool", "LocalImportancePool", "MaxPoolDown",
           "StridedConvDown", "build_downsampler"]
