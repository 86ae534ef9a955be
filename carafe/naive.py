"""The common pure-PyTorch CARAFE found in many repositories, kept as the benchmarks' baseline (not a backend).

It materialises every input pixel's k x k neighbourhood with ``F.unfold`` (k^2 times the input), nearest-upsamples
that to the output size (another sigma^2), weights it with the masks and sums over the taps. Differentiated by
autograd, which keeps those large intermediates alive for the backward pass.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def carafe_unfold(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int) -> Tensor:
    n, c, h, w = features.shape
    taps = kernel_size * kernel_size
    neighbourhoods = F.unfold(features, kernel_size, padding=kernel_size // 2).view(n, c * taps, h, w)
    neighbourhoods = F.interpolate(neighbourhoods, scale_factor=scale_factor, mode="nearest")
    neighbourhoods = neighbourhoods.view(n, group_size, c // group_size, taps, h * scale_factor, w * scale_factor)
    weights = masks.view(n, group_size, 1, taps, h * scale_factor, w * scale_factor)
    return (neighbourhoods * weights).sum(dim=3).view(n, c, h * scale_factor, w * scale_factor)


def carafe_down_unfold(features: Tensor, masks: Tensor, kernel_size: int, group_size: int,
                       scale_factor: int) -> Tensor:
    n, c, _, _ = features.shape
    out_h, out_w = masks.shape[-2:]
    taps = kernel_size * kernel_size
    neighbourhoods = F.unfold(features, kernel_size, padding=kernel_size // 2, stride=scale_factor)
    neighbourhoods = neighbourhoods.view(n, group_size, c // group_size, taps, out_h, out_w)
    weights = masks.view(n, group_size, 1, taps, out_h, out_w)
    return (neighbourhoods * weights).sum(dim=3).view(n, c, out_h, out_w)
