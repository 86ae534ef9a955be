"""Qualitative inpainting grids (ICCV 2019 Figure 9): one row per validation image, columns masked input, each
model's composited output, original. Written to TensorBoard during training and by ``scripts/inpainting_figure.py``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tasks.common.io import write_bytes_atomic

GAP = 2  # px of white between cells


def masked_input(images: Tensor, masks: Tensor) -> Tensor:
    """What the generator is given, as a picture: the holes painted white. Tensor[N, 3, H, W] in [-1, 1]."""
    return images * (1 - masks) + masks


def comparison_grid(columns: Sequence[Tensor]) -> np.ndarray:
    """Columns of Tensor[N, 3, H, W] in [-1, 1] -> uint8 [N (H + gap) - gap, C (W + gap) - gap, 3]: image i of
    column j in row i, column j, separated by white gaps."""
    if not columns:
        raise ValueError("a grid needs at least one column")
    shape = columns[0].shape
    if any(c.shape != shape for c in columns):
        raise ValueError(f"every column must have the shape {tuple(shape)}, got {[tuple(c.shape) for c in columns]}")
    count, _, height, width = shape
    grid = np.full((count * (height + GAP) - GAP, len(columns) * (width + GAP) - GAP, 3), 255, np.uint8)
    for j, column in enumerate(columns):
        pixels = ((column.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu()
        for i in range(count):
            top, left = i * (height + GAP), j * (width + GAP)
            grid[top:top + height, left:left + width] = pixels[i].numpy()
    return grid


def write_png(path: str | Path, grid: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] grid as a PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


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
