"""Inpainting metrics on the composited output, per image, averaged over the validation set.

Neither paper defines its "L1 (%)"; two conventions are in use (mmediting 0.x: the mean over hole pixels on [-1, 1];
mmagic 1.x: on [0, 1], over the hole, x100), a factor of 2 apart. Both images are mapped to [0, 1] and quantised to
8 bits first (what a saved result holds), then:

- ``l1``: mean |output - target| over every pixel and channel of the composite, in percent (the whole image, where
  the composite equals the target outside the hole, so it scales with the hole's area);
- ``l1_hole``: the same mean over the hole's pixels only, in percent (mmagic 1.x's convention);
- ``psnr``: 10 log10(1 / MSE) over the whole composite, in dB (data range 1), per image, then averaged;
- ``ssim``: scikit-image's ``structural_similarity`` on the whole composite (channel axis last, data range 1).

The tables show ``l1`` beside ``psnr``: both are whole-image scores of the composite, as the papers' PSNR is; the
published L1 values (6.7-6.8 %) with a PSNR of 19.6 dB fit a whole-image mean better than a hole-only one of the
same images, but the papers do not say, and ``l1_hole`` is recorded in every run's metrics for the other reading.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_unit_8bit(images: Tensor) -> Tensor:
    """Tensor in [-1, 1] -> float64 Tensor in [0, 1] on the 8-bit grid (round((x + 1) / 2 * 255) / 255)."""
    return torch.round((images.double().clamp(-1, 1) + 1) / 2 * 255) / 255


def inpainting_scores(outputs: Tensor, targets: Tensor, masks: Tensor) -> dict[str, Tensor]:
    """Per-image scores of composited ``outputs`` against ``targets``.

    outputs, targets: Tensor[N, 3, H, W] in [-1, 1]; masks: Tensor[N, 1, H, W], 1 = hole.
    Returns {"l1", "l1_hole", "psnr", "ssim"}: each a float64 Tensor[N] (see the module doc; an image without a hole
    gets ``l1_hole`` 0).
    """
    from skimage.metrics import structural_similarity

    if outputs.shape != targets.shape or outputs.dim() != 4 or outputs.shape[1] != 3:
        raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} must both be "
                         "[N, 3, H, W]")
    out, ref = to_unit_8bit(outputs), to_unit_8bit(targets)
    error = (out - ref).abs()
    hole = masks.double().expand_as(error)
    mse = ((out - ref) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-20))
    ssim = [structural_similarity(a.permute(1, 2, 0).cpu().numpy(), b.permute(1, 2, 0).cpu().numpy(),
                                  channel_axis=2, data_range=1.0) for a, b in zip(out, ref)]
    return {"l1": 100 * error.flatten(1).mean(1),
            "l1_hole": 100 * (error * hole).flatten(1).sum(1) / hole.flatten(1).sum(1).clamp(min=1),
            "psnr": psnr, "ssim": torch.tensor(np.asarray(ssim, dtype=np.float64), device=outputs.device)}
