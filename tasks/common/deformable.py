"""Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019) on ``torchvision.ops.deform_conv2d``.

A k x k convolution whose k^2 taps are each moved by a learned offset (dy, dx) and scaled by a learned modulation
in (0, 1), both predicted per output location by a plain k x k convolution of the input (same stride, padding and
dilation as the main one):

    out[p] = sum_k  w_k * x(p + p_k + dp_k(p)) * dm_k(p)       (bilinear sampling of x at fractional positions)

As in the DCNv2 paper (and mmcv's ``ModulatedDeformConv2dPack``), the offset / modulation predictor starts at zero,
so at initialisation dp_k = 0 and dm_k = sigmoid(0) = 0.5: the layer is the regular convolution times 0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 with one offset group: ``weight`` (and ``bias``) as ``nn.Conv2d``'s, so a plain convolution's weights
    load into it; ``offset_mask`` predicts 2 k^2 offsets and k^2 modulation logits.

    Shape: Tensor[N, C_in, H, W] -> Tensor[N, C_out, H_out, W_out], H_out and W_out as ``nn.Conv2d``'s.
    Offsets follow ``deform_conv2d``'s layout: channel 2 t is tap t's dy, 2 t + 1 its dx (taps row-major).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, bias: bool = False) -> None:
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                                 ("dilation", dilation, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)
        taps = kernel_size * kernel_size
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, stride, padding, dilation, bias=True)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConv2d:
        """The DCNv2 version of a square, ungrouped ``conv``, with a copy of its weights (and bias)."""
        square = (conv.kernel_size[0] == conv.kernel_size[1] and conv.stride[0] == conv.stride[1]
                  and conv.padding[0] == conv.padding[1] and conv.dilation[0] == conv.dilation[1])
        if not square or conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError(f"only square, ungrouped convolutions become deformable, got {conv}")
        deformable = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                         conv.dilation[0], bias=conv.bias is not None)
        with torch.no_grad():
            deformable.weight.copy_(conv.weight)
            if conv.bias is not None:
                deformable.bias.copy_(conv.bias)
        return deformable.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.kernel_size * self.kernel_size
        offset, modulation_logits = self.offset_mask(x).split([2 * taps, taps], dim=1)
        return deform_conv2d(x, offset, self.weight, self.bias, stride=(self.stride, self.stride),
                             padding=(self.padding, self.padding), dilation=(self.dilation, self.dilation),
                             mask=torch.sigmoid(modulation_logits))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")
