"""The pure-PyTorch reference: slow, obviously correct, with its gradients written out. It is the test oracle.

For every tap (ky, kx) of the k x k reassembly window it gathers, for each output location, the input value at
``centre + (ky - r, kx - r)`` from a zero-padded copy of the features, multiplies by that tap's mask channel and adds.
The only difference between up- and downsampling is where an output location's centre lies in the input
(``p // sigma`` versus ``p * sigma``), so both share this code.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from carafe.backends.function import memory_format_of, result_layout


def centre_indices(out_size: int, scale_factor: int, up: bool, device: torch.device) -> Tensor:
    """Input index of the reassembly centre of each output index along one axis."""
    p = torch.arange(out_size, device=device)
    return torch.div(p, scale_factor, rounding_mode="floor") if up else p * scale_factor


def _taps(features: Tensor, out_hw: tuple[int, int], kernel_size: int, scale_factor: int, up: bool
          ) -> Iterator[tuple[int, Tensor, Tensor, Tensor, Tensor]]:
    """For every tap t = ky * k + kx: t, the padded rows and columns it reads for each output row / column, and
    whether each of those lies inside the map (shape (out_h, out_w))."""
    h, w = features.shape[-2:]
    r = kernel_size // 2
    rows = centre_indices(out_hw[0], scale_factor, up, features.device)
    cols = centre_indices(out_hw[1], scale_factor, up, features.device)
    for ky in range(kernel_size):
        for kx in range(kernel_size):
            # Padding shifts every index by r, so input row `centre + ky - r` is padded row `centre + ky`.
            inside = ((rows + ky - r >= 0) & (rows + ky - r < h))[:, None] \
                & ((cols + kx - r >= 0) & (cols + kx - r < w))[None, :]
            yield ky * kernel_size + kx, rows + ky, cols + kx, inside


def reassemble(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int,
               up: bool) -> Tensor:
    n, c, _, _ = features.shape
    out_h, out_w = masks.shape[-2:]
    r = kernel_size // 2
    padded = F.pad(features, (r, r, r, r))
    masks = masks.reshape(n, group_size, 1, kernel_size * kernel_size, out_h, out_w)
    out = features.new_zeros(n, group_size, c // group_size, out_h, out_w)
    for tap, rows, cols, inside in _taps(features, (out_h, out_w), kernel_size, scale_factor, up):
        taps = padded.index_select(2, rows).index_select(3, cols).reshape(n, group_size, c // group_size, out_h, out_w)
        # A tap outside the map contributes exactly zero, even where its mask weight is NaN or infinite.
        out = out + torch.where(inside, taps * masks[:, :, :, tap], 0)
    return out.reshape(n, c, out_h, out_w)


def reassemble_backward(kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor, kernel_size: int,
                        group_size: int, scale_factor: int, up: bool) -> Tensor:
    """The gradient of ``reassemble`` w.r.t. features (``backward_features``: every tap's weighted output gradient
    added back where the tap read) or masks (``backward_masks``: each tap's reads times the output gradient, summed
    over its group's channels), written out rather than taken from autograd, which registered ops run below."""
    n, c, h, w = features.shape
    out_h, out_w = masks.shape[-2:]
    r = kernel_size // 2
    grad = grad_out.reshape(n, group_size, c // group_size, out_h, out_w)
    weights = masks.reshape(n, group_size, 1, kernel_size * kernel_size, out_h, out_w)
    padded = F.pad(features, (r, r, r, r))
    grad_padded = torch.zeros_like(padded)
    grad_masks = torch.zeros_like(weights)
    for tap, rows, cols, inside in _taps(features, (out_h, out_w), kernel_size, scale_factor, up):
        if kernel == "backward_features":
            contribution = torch.where(inside, grad * weights[:, :, :, tap], 0).reshape(n, c, out_h, out_w)
            by_column = padded.new_zeros(n, c, out_h, w + 2 * r).index_add_(3, cols, contribution)
            grad_padded.index_add_(2, rows, by_column)
        else:
            taps = padded.index_select(2, rows).index_select(3, cols).reshape(grad.shape)
            grad_masks[:, :, 0, tap] = torch.where(inside, (grad * taps).sum(2), 0)
    if kernel == "backward_features":
        return grad_padded[:, :, r:r + h, r:r + w]
    return grad_masks.reshape(masks.shape)


class ReferenceBackend:
    def unavailable_reason(self, features: Tensor) -> str | None:
        return None

    def compute(self, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None, kernel_size: int,
                group_size: int, scale_factor: int, up: bool) -> Tensor:
        """``reassemble`` or one of its gradients."""
        shape, layout_of = result_layout(kernel, features, masks, grad_out)
        if kernel == "forward":
            result = reassemble(features, masks, kernel_size, group_size, scale_factor, up)
        else:
            result = reassemble_backward(kernel, features, masks, grad_out, kernel_size, group_size, scale_factor, up)
        return result.contiguous(memory_format=memory_format_of(layout_of))


BACKEND = ReferenceBackend()
