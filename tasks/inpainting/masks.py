"""Hole masks: DeepFill v2's free-form brush strokes (Yu et al. 2019, ``brush_stroke_mask`` in
``inpaint_ops.py``), random boxes, and the fixed, seeded validation set every row of a table is scored on.

All masks are float32 numpy arrays [H, W] with 1 = hole, drawn from a ``numpy.random.Generator``, so a mask is a
function of the generator's seed alone.

Free-form strokes (DeepFill v2's parameters): 1-3 strokes, each of 4-11 vertices from a uniform start point; each
segment's direction is an angle a drawn uniformly from [2 pi / 5 - 2 pi / 15, 2 pi / 5 + 2 pi / 15], taken as
2 pi - a on even segments, so a stroke zigzags; step lengths ~ N(r, r / 2) clipped to [0, 2r] with
r = sqrt(H^2 + W^2) / 8; a width drawn uniformly from [12, 40] px per stroke (scaled by ``min(H, W) / 256`` for
smaller images, so a 64 px image gets 3-10 px strokes); segments drawn as lines with a disc at every vertex; a
random horizontal and vertical flip at the end. Training masks are strokes united with a box (as DeepFill v2
trains); validation masks are drawn the same way from ``(seed, index)``.

Boxes: height and width uniform in [H / 8, H / 2] (DeepFill v2's 128 px maximum at 256 px), placed uniformly.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from carafe.ops import check_int

MIN_STROKES, MAX_STROKES = 1, 3
MIN_VERTICES, MAX_VERTICES = 4, 11
MEAN_ANGLE, ANGLE_RANGE = 2 * math.pi / 5, 2 * math.pi / 15
MIN_WIDTH, MAX_WIDTH = 12, 40          # px at 256 px
REFERENCE_SIZE = 256
MASK_KINDS = ("free_form", "box", "free_form_and_box")


def free_form_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """DeepFill v2's brush-stroke mask (module doc): float32 [height, width], 1 = hole."""
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    radius = math.sqrt(height ** 2 + width ** 2) / 8
    scale = min(height, width) / REFERENCE_SIZE
    for _ in range(rng.integers(MIN_STROKES, MAX_STROKES + 1)):
        vertices = int(rng.integers(MIN_VERTICES, MAX_VERTICES + 1))
        stroke_width = max(1, round(rng.uniform(MIN_WIDTH, MAX_WIDTH) * scale))
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height)))]
        for index in range(vertices):
            angle = rng.uniform(MEAN_ANGLE - ANGLE_RANGE, MEAN_ANGLE + ANGLE_RANGE)
            angle = 2 * math.pi - angle if index % 2 == 0 else angle
            step = float(np.clip(rng.normal(radius, radius / 2), 0, 2 * radius))
            x, y = points[-1]
            points.append((float(np.clip(x + step * math.cos(angle), 0, width - 1)),
                           float(np.clip(y + step * math.sin(angle), 0, height - 1))))
        draw.line(points, fill=255, width=stroke_width)
        half = stroke_width / 2
        for x, y in points:
            draw.ellipse((x - half, y - half, x + half, y + half), fill=255)
    mask = np.asarray(canvas, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    if rng.random() < 0.5:
        mask = mask[::-1, :]
    return (mask > 0.5).astype(np.float32)


def box_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One axis-aligned box (module doc): float32 [height, width], 1 = hole."""
    height, width = check_int("height", height, 1), check_int("width", width, 1)
    box_h = int(rng.integers(max(1, height // 8), max(1, height // 2) + 1))
    box_w = int(rng.integers(max(1, width // 8), max(1, width // 2) + 1))
    top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    mask = np.zeros((height, width), np.float32)
    mask[top:top + box_h, left:left + box_w] = 1
    return mask


def draw_mask(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of ``kind`` (one of ``MASK_KINDS``): float32 [height, width], 1 = hole."""
    if kind == "free_form":
        return free_form_mask(height, width, rng)
    if kind == "box":
        return box_mask(height, width, rng)
    if kind == "free_form_and_box":
        return np.maximum(free_form_mask(height, width, rng), box_mask(height, width, rng))
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")


def validation_mask(kind: str, size: int, seed: int, index: int) -> np.ndarray:
    """The ``index``-th mask of the fixed validation set drawn from ``seed``: the same holes for every model."""
    return draw_mask(kind, size, size, np.random.default_rng([seed, index]))
