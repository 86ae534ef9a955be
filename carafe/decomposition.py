"""The reassembly written in standard tensor operations only, for exporters that cannot call the registered operator.

ONNX has no reassembly operator, so ``carafe`` / ``carafe_down`` emit this instead while ``torch.onnx.export`` traces
them (both the TorchScript exporter and ``dynamo=True``). Upsampling gathers the k*k shifted copies of the
zero-padded features with slices (k^2 times the input, never sigma^2 more) and contracts them with the kernels in
one batched matrix product per input pixel: its k^2 taps meet its sigma x sigma block of kernels, (C/G, k^2) @
(k^2, sigma^2). Downsampling, with one kernel per output pixel, adds up the k^2 strided slices times their kernel
weights instead (in onnxruntime on a CPU that ran 2.3x faster than the matrix-product form at (2, 256, 64, 64),
k = 5, sigma = 2, while for upsampling the per-tap sum ran 5x slower; scripts/bench_onnx.py times the exported
modules). Kernel weights of taps that fall outside the map are zeroed first, so they contribute exactly zero even
when NaN or infinite (the contract). Every size is read from the tensors, so exported graphs keep dynamic sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _inside(length: Tensor | int, positions: int, kernel_size: int, step: int, like: Tensor) -> Tensor:
    """(k, positions) booleans: is input index ``step * p + ky - r`` of tap row ky inside [0, length)?"""
    index = (torch.arange(positions, device=like.device) * step)[None, :] \
        + torch.arange(kernel_size, device=like.device)[:, None] - kernel_size // 2
    return (index >= 0) & (index < length)


def reassemble_standard_ops(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int,
                            up: bool) -> Tensor:
    """Same contract as ``carafe.carafe`` (``up``) / ``carafe.carafe_down``; inputs are already validated."""
    n, c, h, w = features.shape
    out_h, out_w = masks.shape[-2:]
    k, g, s, taps = kernel_size, group_size, scale_factor, kernel_size * kernel_size
    r = k // 2
    # Windows are centred on every input pixel (up) or on every s-th one (down); (rows, cols) is that grid.
    rows, cols, step = (h, w, 1) if up else (out_h, out_w, s)
    padded = F.pad(features, (r, r, r, r))

    def tap_slice(ky: int, kx: int) -> Tensor:  # the input value each window centre sees at tap (ky, kx)
        return padded[:, :, ky:ky + step * (rows - 1) + 1:step, kx:kx + step * (cols - 1) + 1:step]

    inside = (_inside(h, rows, k, step, features)[:, None, :, None]
              & _inside(w, cols, k, step, features)[None, :, None, :]).reshape(taps, rows, cols)
    block = s if up else 1  # output pixels per window along each axis
    weights = masks.reshape(n, g, taps, rows, block, cols, block)
    weights = torch.where(inside[:, :, None, :, None], weights, torch.zeros_like(weights))
    if not up:
        weights = weights.reshape(n, g, 1, taps, rows, cols)
        out = sum(tap_slice(ky, kx).reshape(n, g, c // g, rows, cols) * weights[:, :, :, ky * k + kx]
                  for ky in range(k) for kx in range(k))
        return out.reshape(n, c, out_h, out_w)
    shifted = [tap_slice(ky, kx) for ky in range(k) for kx in range(k)]
    windows = torch.stack(shifted, 2).reshape(n, g, c // g, taps, rows, cols).permute(0, 1, 4, 5, 2, 3)
    weights = weights.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, g, rows, cols, taps, block * block)
    out = torch.matmul(windows, weights)  # (n, g, rows, cols, C / G, block^2)
    out = out.reshape(n, g, rows, cols, c // g, block, block).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(n, c, out_h, out_w)
