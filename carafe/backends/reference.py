"""The pure-PyTorch reference: slow, obviously correct, differentiated by autograd. It is the test oracle.

For every tap (ky, kx) of the k x k reassembly window it gathers, for each output location, the input value at
``centre + (ky - r, kx - r)`` from a zero-padded copy of the features, multiplies by that tap's mask channel and adds.
The only difference between up- and downsampling is where an output location's centre lies in the input
(``p // sigma`` versus ``p * sigma``), so both share this code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from carafe.backends.function import memory_format_of, result_layout


def centre_indices(out_size: int, scale_factor: int, up: bool, device: torch.device) -> Tensor:
    """Input index of the reassembly centre of each output index along one axis."""
    p = torch.arange(out_size, device=device)
    return torch.div(p, scale_factor, rounding_mode="floor") if up else p * scale_factor


def reassemble(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int,
               up: bool) -> Tensor:
    n, c, h, w = features.shape
    out_h, out_w = masks.shape[-2:]
    r = kernel_size // 2
    padded = F.pad(features, (r, r, r, r))
    rows = centre_indices(out_h, scale_factor, up, features.device)
    cols = centre_indices(out_w, scale_factor, up, features.device)
    masks = masks.reshape(n, group_size, 1, kernel_size * kernel_size, out_h, out_w)
    out = features.new_zeros(n, group_size, c // group_size, out_h, out_w)
    for ky in range(kernel_size):
        # Padding shifts every index by r, so input row `centre + ky - r` is padded row `centre + ky`.
        tap_rows = padded.index_select(2, rows + ky)
        row_inside = (rows + ky - r >= 0) & (rows + ky - r < h)
        for kx in range(kernel_size):
            taps = tap_rows.index_select(3, cols + kx).reshape(n, group_size, c // group_size, out_h, out_w)
            inside = row_inside[:, None] & ((cols + kx - r >= 0) & (cols + kx - r < w))[None, :]
            # A tap outside the map contributes exactly zero, even where its mask weight is NaN or infinite.
            out = out + torch.where(inside, taps * masks[:, :, :, ky * kernel_size + kx], 0)
    return out.reshape(n, c, out_h, out_w)


class ReferenceBackend:
    def unavailable_reason(self, features: Tensor) -> str | None:
        return None

    def compute(self, kernel: str, features: Tensor, masks: Tensor, grad_out: Tensor | None, kernel_size: int,
                group_size: int, scale_factor: int, up: bool) -> Tensor:
        """``reassemble``, or one of its gradients as autograd's vector-Jacobian product of it."""
        shape, layout_of = result_layout(kernel, features, masks, grad_out)
        if kernel == "forward":
            result = reassemble(features, masks, kernel_size, group_size, scale_factor, up)
        else:
            wrt = 0 if kernel == "backward_features" else 1
            inputs = [features.detach(), masks.detach()]
            inputs[wrt].requires_grad_()
            with torch.enable_grad():
                out = reassemble(*inputs, kernel_size, group_size, scale_factor, up)
                (result,) = torch.autograd.grad(out, inputs[wrt], grad_out)
        return result.contiguous(memory_format=memory_format_of(layout_of))


BACKEND = ReferenceBackend()
