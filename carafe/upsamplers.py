"""The upsamplers CARAFE is compared with (ICCV 2019 Table 2 / 3, CARAFE++ Table IV; DySample, ICCV 2023, beyond
the papers), and their factory.

Every operator maps Tensor[N, C, H, W] to Tensor[N, C, sigma * H, sigma * W], keeps the channel count, takes plain
keyword arguments ``(channels, scale_factor, **options)`` and reports ``flops_per_pixel()`` (FLOPs per input pixel,
papers' convention: see ``carafe.costs``). The defaults reproduce Table 2's costs at C = 256, sigma = 2.

    from carafe import build_upsampler
    up = build_upsampler("carafe", channels=256, scale_factor=2, up_kernel=5)
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carafe.costs import conv_flops
from carafe.modules import CARAFEPack, pixel_shuffle
from carafe.ops import check_int, check_odd
from carafe.zoo import Registry

INTERPOLATIONS = ("nearest", "bilinear")


def _interpolate(x: Tensor, scale_factor: int, mode: str) -> Tensor:
    if mode == "nearest":
        return F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    return F.interpolate(x, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def _interpolation_flops(mode: str, channels: int, scale_factor: int) -> int:
    """Per input pixel: nearest copies (0); bilinear is 4 multiply-adds per output element (8 sigma^2 C)."""
    return 0 if mode == "nearest" else 8 * scale_factor * scale_factor * channels


def _check_mode(mode: str) -> str:
    if mode not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r}; choose one of {', '.join(INTERPOLATIONS)}")
    return mode


class _Upsampler(nn.Module):
    """Base of the zoo's upsamplers. Class attributes tell a host network what it needs to know about an operator,
    so that no host special-cases an operator by class or name:

    ``keeps_own_init``: the operator's initialisation is part of its design (a host that re-initialises the convs
        it holds, as mmdetection's FPN and mask head do, must leave this operator's alone).
    ``activation_follows``: the papers' hosts follow this operator with a ReLU (mmdetection's ``FCNMaskHead``
        applies one after its deconvolution, not after interpolation or CARAFE).
    """

    keeps_own_init: ClassVar[bool] = False
    activation_follows: ClassVar[bool] = False

    def __init__(self, channels: int, scale_factor: int) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, 1)
        self.scale_factor = check_int("scale_factor", scale_factor, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, scale_factor={self.scale_factor}"


class InterpolateUpsample(_Upsampler):
    """Nearest-neighbour or bilinear interpolation (``align_corners=False``); no parameters.

    Costs per input pixel: nearest 0; bilinear 8 sigma^2 C (4 multiply-adds per output element), which is Table 2's
    "8k" at C = 256, sigma = 2.
    """

    def __init__(self, channels: int, scale_factor: int, mode: str = "nearest") -> None:
        super().__init__(channels, scale_factor)
        self.mode = _check_mode(mode)

    def forward(self, x: Tensor) -> Tensor:
        return _interpolate(x, self.scale_factor, self.mode)

    def flops_per_pixel(self) -> int:
        return _interpolation_flops(self.mode, self.channels, self.scale_factor)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


class InterpolateConvUpsample(_Upsampler):
    """Interpolation followed by a k x k convolution C -> C at the output resolution: ICCV 2019 Sec. 5.2, "N.C." and
    "B.C.": "we add an extra 3x3 convolution layer after the corresponding upsampling".

    Costs per input pixel: interpolation + sigma^2 * 2 (9C + 1) C; at C = 256, sigma = 2: 4.7M FLOPs, 590k params.
    """

    def __init__(self, channels: int, scale_factor: int, mode: str = "nearest", kernel_size: int = 3) -> None:
        super().__init__(channels, scale_factor)
        self.mode = _check_mode(mode)
        self.kernel_size = check_odd("kernel_size", kernel_size)  # odd: "same" padding keeps the size
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_interpolate(x, self.scale_factor, self.mode))

    def flops_per_pixel(self) -> int:
        s2 = self.scale_factor ** 2
        return (_interpolation_flops(self.mode, self.channels, self.scale_factor)
                + s2 * conv_flops(self.channels, self.channels, self.kernel_size))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, kernel_size={self.kernel_size}"


class DeconvUpsample(_Upsampler):
    """Transposed convolution C -> C, kernel k (default 3), stride sigma, padding (k - 1) // 2 and the output padding
    that makes the output exactly sigma * H x sigma * W (Noh et al. 2015, ICCV ref. [30]).

    k = 3 is the reading that gives Table 2's 590k parameters (9 C^2 + C) and the 1180k FLOPs of the ICCV
    introduction: per input pixel every input value meets the whole kernel, 2 * 9 * C^2 = 1,179,648 FLOPs. The bias
    is added at the sigma^2 C output elements per input pixel, +2 sigma^2 C = 2,048 (1,181,696 in all; still Table
    2's 1.2M). mmdetection's mask-head deconv is k = 2, stride 2 (262k params); ``kernel_size=2`` builds it.
    """

    activation_follows = True

    def __init__(self, channels: int, scale_factor: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__(channels, scale_factor)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        padding = (kernel_size - 1) // 2
        output_padding = scale_factor + 2 * padding - kernel_size
        if not 0 <= output_padding < scale_factor:
            raise ValueError(f"kernel_size={kernel_size} cannot give an exact {scale_factor}x output "
                             f"(an even kernel needs scale_factor >= 2); use an odd kernel_size")
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size, stride=scale_factor, padding=padding,
                                         output_padding=output_padding, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv(x)

    def flops_per_pixel(self) -> int:
        c, s2 = self.channels, self.scale_factor ** 2
        bias = 2 * s2 * c if self.deconv.bias is not None else 0
        return 2 * self.kernel_size ** 2 * c * c + bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"


class PixelShuffleUpsample(_Upsampler):
    """Sub-pixel convolution (Shi et al. 2016, ICCV ref. [35]): a k x k conv C -> sigma^2 C at the input resolution,
    then ``pixel_shuffle``. At k = 3, C = 256, sigma = 2: 2.36M params, 4.7M FLOPs (Table 2)."""

    def __init__(self, channels: int, scale_factor: int, kernel_size: int = 3) -> None:
        super().__init__(channels, scale_factor)
        self.kernel_size = check_odd("kernel_size", kernel_size)  # odd: "same" padding keeps the size
        self.conv = nn.Conv2d(channels, channels * scale_factor ** 2, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle(self.conv(x), self.scale_factor)  # F.pixel_shuffle's backward fails for N = 0

    def flops_per_pixel(self) -> int:
        return conv_flops(self.channels, self.channels * self.scale_factor ** 2, self.kernel_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"


class GuidedUpsample(_Upsampler):
    """GUM, the guided upsampling module (Mazzini 2018, "Guided upsampling network for real-time semantic
    segmentation", ICCV ref. [26]): a guidance branch predicts a per-output-pixel offset table (dx, dy), and every
    output pixel bilinearly samples the low-resolution map at its own position in that map plus its offset.

    Definition followed: Mazzini's module (offset table at the output resolution, bilinear sampling of the
    low-resolution input). Choices the CARAFE paper leaves open, made here so that Table 2's costs come out:
    the upsampler sees only x, so the guidance branch reads x upsampled by nearest neighbour and runs at the output
    resolution: ``num_hidden_layers`` 1x1 convs C -> hidden (default C) with ReLU, then a 1x1 conv -> 2 offsets
    (in input-pixel units, zero-initialised so that GUM starts as bilinear upsampling). Base positions are those of
    bilinear interpolation with ``align_corners=False``; samples outside the map clamp to the border.
    At C = 256, sigma = 2: 132,098 params (Table 2: 132k); FLOPs per input pixel = sigma^2 x (guidance
    2 x 132,098 + 2 offset additions) + bilinear sampling 8 sigma^2 C = 1,065,000 (Table 2: 1.1M). The published
    figures fix the branch's size (about 132k parameters, all at the output resolution), not its exact layout.
    """

    keeps_own_init = True

    def __init__(self, channels: int, scale_factor: int, hidden_channels: int | None = None,
                 num_hidden_layers: int = 2) -> None:
        super().__init__(channels, scale_factor)
        hidden = channels if hidden_channels is None else check_int("hidden_channels", hidden_channels, 1)
        self.hidden_channels = hidden
        self.num_hidden_layers = check_int("num_hidden_layers", num_hidden_layers, 0)
        layers: list[nn.Module] = []
        width = channels
        for _ in range(num_hidden_layers):
            layers += [nn.Conv2d(width, hidden, 1), nn.ReLU(inplace=True)]
            width = hidden
        self.offset = nn.Conv2d(width, 2, 1)
        self.guidance = nn.Sequential(*layers, self.offset)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.scale_factor
        offsets = self.guidance(F.interpolate(x, scale_factor=s, mode="nearest"))  # Tensor[N, 2, sH, sW]
        # Position of each output pixel in input-pixel coordinates (pixel centres at integers), as bilinear.
        cols = (torch.arange(s * w, device=x.device, dtype=x.dtype) + 0.5) / s - 0.5
        rows = (torch.arange(s * h, device=x.device, dtype=x.dtype) + 0.5) / s - 0.5
        px = cols.view(1, 1, s * w) + offsets[:, 0]
        py = rows.view(1, s * h, 1) + offsets[:, 1]
        # grid_sample's normalised coordinates with align_corners=False: -1 and 1 are the outer pixel edges.
        grid = torch.stack(((px + 0.5) * (2.0 / w) - 1.0, (py + 0.5) * (2.0 / h) - 1.0), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def flops_per_pixel(self) -> int:
        c, s2, hidden = self.channels, self.scale_factor ** 2, self.hidden_channels
        guidance, width = 0, c
        for _ in range(self.num_hidden_layers):
            guidance, width = guidance + conv_flops(width, hidden, 1), hidden
        guidance += conv_flops(width, 2, 1)
        return s2 * (guidance + 2) + 8 * s2 * c

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, hidden_channels={self.hidden_channels}, "
                f"num_hidden_layers={self.num_hidden_layers}")


class SpatialAttentionUpsample(_Upsampler):
    """S.A.: upsampling, then a predicted spatial attention map rescales the features at every location.

    Definition followed: the CARAFE paper's (ICCV 2019 Sec. 3.4: "spatial attention predicts an attention map with
    the same size as the input feature, and then rescales the feature map on each location"; ref. [3], SCA-CNN, is
    cited for the idea, but its softmax-over-locations attention pools a vector and is not an upsampler). Here: the
    map is interpolated (bilinear by default), a k x k conv C -> 1 (k = 3) with a sigmoid predicts the attention
    map at the output resolution, and the upsampled map is multiplied by it.
    At C = 256, sigma = 2: 2,305 params (Table 2: 2.3k); FLOPs per input pixel = bilinear 8,192 + conv
    4 x 2 (9 x 256 + 1) = 18,440 + rescaling 1,024 = 27,656 (Table 2: 28k).
    """

    def __init__(self, channels: int, scale_factor: int, mode: str = "bilinear", kernel_size: int = 3) -> None:
        super().__init__(channels, scale_factor)
        self.mode = _check_mode(mode)
        self.kernel_size = check_odd("kernel_size", kernel_size)  # odd: "same" padding keeps the size
        self.attention = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        up = _interpolate(x, self.scale_factor, self.mode)
        return up * torch.sigmoid(self.attention(up))

    def flops_per_pixel(self) -> int:
        s2 = self.scale_factor ** 2
        return (_interpolation_flops(self.mode, self.channels, self.scale_factor)
                + s2 * conv_flops(self.channels, 1, self.kernel_size) + s2 * self.channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, kernel_size={self.kernel_size}"


DYSAMPLE_STYLES = ("lp", "pl")


class DySampleUpsample(_Upsampler):
    """DySample (Liu, Lu, Fu and Cao, "Learning to Upsample by Learning to Sample", ICCV 2023): every output pixel
    bilinearly samples the input at its own position plus a predicted offset, with ``F.grid_sample``.

    Definition followed (the paper's Sec. 3 and the authors' code, read for the facts; written here):

    * positions: output pixel (Y, X) starts at ((X + 0.5) / s - 0.5, (Y + 0.5) / s - 0.5) in input pixels (pixel
      centres at integers), the positions of bilinear interpolation with ``align_corners=False`` (the paper's
      "bilinear initialisation" of the sampling grid); the predicted offset, in input pixels, is added and the input
      is sampled bilinearly, clamped to the border (``padding_mode="border"``).
    * groups: the channels are split into ``groups`` groups (4 by default, as the paper's), each with its own
      offsets, so every output pixel has 2 * groups offsets.
    * ``style="lp"`` (linear, then pixel shuffle; the paper's DySample): a 1x1 conv C -> 2 g s^2 on the input,
      pixel-shuffled to 2 g offsets per output pixel. ``style="pl"`` (pixel shuffle, then linear; DySample-S): the
      input pixel-shuffled to C / s^2 channels at the output resolution, then a 1x1 conv C / s^2 -> 2 g.
    * scope: static (default), offset = 0.25 * conv(x), the paper's "static scope factor" that keeps neighbouring
      sampling points from overlapping; ``dynamic_scope=True`` (DySample+ / DySample-S+): offset =
      0.5 * sigmoid(scope(x)) * conv(x), ``scope`` a bias-free 1x1 conv shaped like the offset conv.
    * initialisation (the authors' code): offset conv weights from N(0, ``init_std``^2) with ``init_std = 0.001``,
      bias 0; scope weights 0 (a factor of 0.25 at the start). With ``init_std=0`` every offset starts at zero and
      DySample starts as exactly bilinear upsampling (``align_corners=False``), in every style and scope.

    The offset channels are ordered (x / y, group, sub-pixel row, sub-pixel column) as in the authors' code, whose
    ``offset`` / ``scope`` weights therefore load unchanged.

    Costs per input pixel (papers' convention, see ``carafe.costs``), with E = 2 g s^2 offsets per input pixel:
    the offset conv (``lp``: 2 (C + 1) * 2 g s^2; ``pl``: s^2 * 2 (C / s^2 + 1) * 2 g), for a dynamic scope its
    bias-free twin and E products, E additions of the offsets to the base positions (the scope's constants fold into
    the coordinate scaling, which like GUM's counts 0), and bilinear sampling, 8 s^2 C. At C = 256, sigma = 2,
    groups 4: ``lp`` 24,672 FLOPs and 8,224 params (dynamic: 41,088 and 16,416); ``pl`` 12,384 FLOPs and 520 params
    (dynamic: 16,512 and 1,032).
    """

    keeps_own_init = True

    def __init__(self, channels: int, scale_factor: int, style: str = "lp", groups: int = 4,
                 dynamic_scope: bool = False, init_std: float = 0.001) -> None:
        super().__init__(channels, scale_factor)
        if style not in DYSAMPLE_STYLES:
            raise ValueError(f"unknown DySample style {style!r}; choose one of {', '.join(DYSAMPLE_STYLES)}")
        self.style = style
        self.groups = check_int("groups", groups, 1)
        if channels % groups:
            raise ValueError(f"groups={groups} must divide channels={channels}; pick groups among the divisors of "
                             f"{channels}")
        s2 = scale_factor * scale_factor
        if style == "pl" and channels % s2:
            raise ValueError(f"style='pl' pixel-shuffles the input, so channels={channels} must be a multiple of "
                             f"scale_factor^2={s2}; use style='lp'")
        if not isinstance(dynamic_scope, bool):
            raise TypeError(f"dynamic_scope must be True or False, got {dynamic_scope!r}")
        self.dynamic_scope = dynamic_scope
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.init_std = float(init_std)
        in_channels, out_channels = (channels, 2 * groups * s2) if style == "lp" else (channels // s2, 2 * groups)
        self.offset = nn.Conv2d(in_channels, out_channels, 1)
        self.scope = nn.Conv2d(in_channels, out_channels, 1, bias=False) if dynamic_scope else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: offset weights N(0, init_std^2), offset bias 0, scope weights 0 (hosts such
        as the FPN leave it alone: ``keeps_own_init``)."""
        nn.init.normal_(self.offset.weight, std=self.init_std)
        nn.init.zeros_(self.offset.bias)
        if self.scope is not None:
            nn.init.zeros_(self.scope.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, C, H, W] -> Tensor[N, C, s * H, s * W]."""
        n, c, h, w = x.shape
        s, g = self.scale_factor, self.groups
        features = x if self.style == "lp" else pixel_shuffle(x, s)  # pl: Tensor[N, C / s^2, sH, sW]
        offsets = self.offset(features)
        if self.scope is not None:
            offsets = offsets * torch.sigmoid(self.scope(features))
        if self.style == "lp":
            offsets = pixel_shuffle(offsets, s)
        offset_x, offset_y = offsets.view(n, 2, g, s * h, s * w).unbind(1)  # each Tensor[N, g, sH, sW], in pixels
        # grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer pixel edges): output
        # pixel X's own position (X + 0.5) / s - 0.5 becomes (2 X + 1) / (s W) - 1, and an offset of one input pixel
        # 2 / W; the scope factor (0.25, or 0.5 before the sigmoid) joins that constant.
        factor = 0.5 if self.scope is not None else 0.25
        base_x = (2 * torch.arange(s * w, device=x.device, dtype=x.dtype) + 1) / (s * w) - 1
        base_y = (2 * torch.arange(s * h, device=x.device, dtype=x.dtype) + 1) / (s * h) - 1
        grid = torch.stack((offset_x * (2 * factor / w) + base_x, offset_y * (2 * factor / h) + base_y[:, None]),
                           dim=-1)  # Tensor[N, g, sH, sW, 2]
        sampled = F.grid_sample(x.reshape(n * g, c // g, h, w), grid.reshape(n * g, s * h, s * w, 2),
                                mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.view(n, c, s * h, s * w)

    def flops_per_pixel(self) -> int:
        c, s2, g = self.channels, self.scale_factor ** 2, self.groups
        offsets = 2 * g * s2
        if self.style == "lp":
            conv = conv_flops(c, offsets, 1)
            scope = conv_flops(c, offsets, 1, bias=False)
        else:
            conv = s2 * conv_flops(c // s2, 2 * g, 1)
            scope = s2 * conv_flops(c // s2, 2 * g, 1, bias=False)
        dynamic = scope + offsets if self.dynamic_scope else 0
        return conv + dynamic + offsets + 8 * s2 * c

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, style={self.style}, groups={self.groups}, "
                f"dynamic_scope={self.dynamic_scope}")


UPSAMPLERS = Registry("upsampler", {
    "nearest": (InterpolateUpsample, {"mode": "nearest"}),
    "bilinear": (InterpolateUpsample, {"mode": "bilinear"}),
    "nearest_conv": (InterpolateConvUpsample, {"mode": "nearest"}),
    "bilinear_conv": (InterpolateConvUpsample, {"mode": "bilinear"}),
    "deconv": (DeconvUpsample, {}),
    "pixel_shuffle": (PixelShuffleUpsample, {}),
    "gum": (GuidedUpsample, {}),
    "spatial_attention": (SpatialAttentionUpsample, {}),
    "carafe": (CARAFEPack, {}),
    "dysample": (DySampleUpsample, {}),
})


def build_upsampler(spec: object, channels: int, scale_factor: int, **options: object) -> nn.Module:
    """Build an upsampler Tensor[N, C, H, W] -> Tensor[N, C, sigma H, sigma W].

    ``spec`` is a name (``UPSAMPLERS.names``), a mapping with ``type`` or ``name`` plus options, a class, or any
    callable such as a ``functools.partial`` or a Hydra ``_partial_`` object, called with ``channels`` and
    ``scale_factor``. Keyword ``options`` override the ones in ``spec``.
    """
    return UPSAMPLERS.build(spec, channels=channels, scale_factor=scale_factor, **options)


__all__ = ["DeconvUpsample", "DySampleUpsample", "GuidedUpsample", "InterpolateConvUpsample",
           "InterpolateUpsample", "PixelShuffleUpsample", "SpatialAttentionUpsample", "UPSAMPLERS", "build_upsampler"]
