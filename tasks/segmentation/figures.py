"""Label maps as pictures (ICCV 2019 Figure 8, ``scripts/segmentation_figure.py``): a fixed palette, the same for
every figure and run, with label 0 ("other", ignored by training and metrics) black.

The palette is the PASCAL VOC development kit's (Everingham et al. 2010, ``labelcolormap``): the bits of the class
number c are dealt in turn to red, green and blue, from each channel's highest bit down, so classes 1..7 are the
primaries and their mixes at 128, class 8 is (64, 0, 0), and every c in 0..255 has its own colour.
"""

from __future__ import annotations

import numpy as np


def label_palette(size: int = 256) -> np.ndarray:
    """uint8 [size, 3]: row c the colour of class c (c = 0 black); distinct rows for size <= 256."""
    if not isinstance(size, int) or not 1 <= size <= 256:
        raise ValueError(f"a palette has 1 to 256 colours (8-bit labels), got {size!r}")
    palette = np.zeros((size, 3), np.uint8)
    for c in range(size):
        bits = c
        for level in range(7, -1, -1):  # the next three bits of c go to bit `level` of red, green, blue
            for channel in range(3):
                palette[c, channel] |= ((bits >> channel) & 1) << level
            bits >>= 3
    return palette


PALETTE = label_palette()


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """Label map int [H, W] in 0..255 -> uint8 [H, W, 3] in ``PALETTE`` (0 = other: black)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"a label map is [H, W] of 0..255, got shape {labels.shape}"
                         + (f" with values {labels.min()}..{labels.max()}" if labels.size else ""))
    return PALETTE[labels.astype(np.intp)]
