"""Qualitative inpainting grids (ICCV 2019 Figure 9): one row per validation image, columns masked input, each
model's composited output, original. Written to TensorBoard during training and by ``scripts/inpainting_figure.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tasks.common.qualitative import image_grid


def masked_input(images: Tensor, masks: Tensor) -> Tensor:
    """What the generator is given, as a picture: the holes painted white. Tensor[N, 3, H, W] in [-1, 1]."""
    return images * (1 - masks) + masks


def comparison_grid(columns: Sequence[Tensor]) -> np.ndarray:
    """Columns of Tensor[N, 3, H, W] in [-1, 1] -> uint8 [N (H + gap) - gap, C (W + gap) - gap, 3]: image i of
    column j in row i, column j, separated by white gaps (``tasks.common.qualitative.image_grid``)."""
    if not columns:
        raise ValueError("a grid needs at least one column")
    shape = columns[0].shape
    if any(c.shape != shape for c in columns):
        raise ValueError(f"every column must have the shape {tuple(shape)}, got {[tuple(c.shape) for c in columns]}")
    pixels = [((c.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
              for c in columns]
    return image_grid([[column[i] for column in pixels] for i in range(shape[0])])


@torch.no_grad()
def first_validation_grid(model: torch.nn.Module, dataset: torch.utils.data.Dataset, count: int,
                          device: torch.device) -> np.ndarray:
    """The grid (masked input, ``model``'s composite, original) of the first ``count`` validation items, with their
    fixed masks; ``model`` is called in eval mode and left in the mode it was in."""
    images, masks = (torch.stack(t).to(device) for t in zip(*(dataset[i] for i in range(min(count, len(dataset))))))
    was_training = model.training
    model.eval()
    try:
        output = model(images, masks)
    finally:
        model.train(was_training)
    return comparison_grid([masked_input(images, masks), output, images])
