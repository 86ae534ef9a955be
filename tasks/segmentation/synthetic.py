"""The embedded default for segmentation: small procedural street scenes in ADE20k's own on-disk layout.

    root/ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...      images/validation/ADE_val_*.jpg
    root/ADEChallengeData2016/annotations/training/ADE_train_00000001.png ... annotations/validation/*.png
    root/synthetic.json                      (the generator's settings; marks the folder as this dataset)

Annotations are 8-bit PNGs as ADE20k's: 0 is "other" (ignored by training and metrics), 1..8 the classes of
``CLASS_NAMES``. The scenes are built so that upsampling quality matters, at a few dozen pixels: a curved horizon
between sky and ground, buildings with window grids, a tree with a wavy outline, fences of 3-4 px pickets 6-9 px
apart, poles 3-5 px wide, sagging wires 2-3 px thick, small balls (radius 3-6 px) and a few unlabelled clutter blobs
(label 0). The thin structures are about one cell of a stride-4 logit map wide (UperNet's output grid, resized
bilinearly to the labels), the finest such a decoder can draw: a 64 px image then asks for structure at the
resolution a 450 px ADE20k image does of a pole a few pixels wide. Version 1 drew them 1-2 px wide (wires 1 px,
balls radius 1.5-4), a quarter to half a logit cell, and no model learned any of them at tiny scale: every run
scored an IoU of 0 on all four.
Colours are drawn per image around a per-class mean, with pixel noise, so colour alone does not separate the thin
classes (pole, wire and fence share dark tones).

The output depends only on the arguments (same bytes twice); it is written to a temporary folder beside ``root`` and
renamed into place (``tasks.common.io.ensure_generated_folder``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from carafe.ops import check_int
from tasks.common.io import ensure_generated_folder
from tasks.common.progress import Progress

CLASS_NAMES = ("sky", "ground", "building", "tree", "fence", "pole", "wire", "ball")
SKY, GROUND, BUILDING, TREE, FENCE, POLE, WIRE, BALL = range(1, len(CLASS_NAMES) + 1)
CLASS_COLOURS = {  # mean RGB on [0, 1]; each image draws its colours around these
    SKY: (0.55, 0.70, 0.90), GROUND: (0.45, 0.40, 0.30), BUILDING: (0.65, 0.55, 0.50), TREE: (0.25, 0.50, 0.22),
    FENCE: (0.30, 0.28, 0.25), POLE: (0.22, 0.22, 0.24), WIRE: (0.15, 0.15, 0.15), BALL: (0.85, 0.30, 0.20)}
COLOUR_JITTER = 0.12
NOISE = 0.04
GENERATOR_VERSION = 2  # 1: 1-2 px poles, pickets and wires (see the module doc)
JPEG_QUALITY = 95
SPLITS = {"train": ("training", "ADE_train"), "val": ("validation", "ADE_val")}
ADE_FOLDER = "ADEChallengeData2016"


def render_scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 image [size, size, 3], uint8 label map [size, size], 0 = other, 1..8 ``CLASS_NAMES``)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    label = np.zeros((size, size), np.uint8)
    horizon = size * rng.uniform(0.35, 0.6) + size * rng.uniform(0.03, 0.1) * np.sin(
        2 * math.pi * xx / (size * rng.uniform(0.6, 1.6)) + rng.uniform(0, 2 * math.pi))
    label[yy < horizon] = SKY
    label[yy >= horizon] = GROUND
    texture = np.zeros((size, size))  # brightness offsets painted with the labels (windows, leaves)

    for _ in range(rng.integers(0, 3)):
        x0 = rng.uniform(0, size * 0.8)
        width, top = rng.uniform(0.12, 0.35) * size, rng.uniform(0.05, 0.3) * size
        inside = (xx >= x0) & (xx < x0 + width) & (yy >= top) & (yy < horizon + 2)
        label[inside] = BUILDING
        period = rng.uniform(3.0, 6.0)
        windows = ((xx - x0) % period < period / 2) & ((yy - top) % period < period / 2)
        texture[inside] = np.where(windows[inside], -0.25, 0.0)

    if rng.random() < 0.8:
        cx, radius = rng.uniform(0.1, 0.9) * size, rng.uniform(0.08, 0.18) * size
        cy = float(horizon[0, min(int(cx), size - 1)]) - radius * 0.6
        angle = np.arctan2(yy - cy, xx - cx)
        wavy = radius * (1 + 0.18 * np.sin(rng.integers(5, 10) * angle + rng.uniform(0, 2 * math.pi)))
        inside = np.hypot(yy - cy, xx - cx) < wavy
        label[inside] = TREE
        texture[inside] = rng.normal(0, 0.08, size=int(inside.sum()))

    if rng.random() < 0.7:
        top = rng.uniform(0.7, 0.85) * size
        height, pitch = rng.uniform(0.12, 0.2) * size, rng.uniform(6.0, 9.0)
        picket = rng.choice([3.0, 4.0])
        x_start, x_end = sorted(rng.uniform(0, size, size=2))
        inside = ((yy >= top) & (yy < top + height) & ((xx - x_start) % pitch < picket)
                  & (xx >= x_start) & (xx < x_end + size * 0.3))
        label[inside] = FENCE

    pole_xs = rng.uniform(0.05, 0.95, size=rng.integers(1, 3)) * size
    pole_top = rng.uniform(0.1, 0.3) * size
    for x in pole_xs:
        width = rng.choice([3.0, 4.0, 5.0])
        label[(np.abs(xx - x) < width / 2 + 0.01) & (yy >= pole_top) & (yy < horizon + size * 0.15)] = POLE

    for _ in range(rng.integers(1, 3)):  # sagging wires: parabolas across the image, 2-3 px thick
        y_mid, sag = rng.uniform(0.1, 0.4) * size, rng.uniform(0.02, 0.12) * size
        centre, thickness = rng.uniform(0.2, 0.8) * size, rng.choice([2.0, 3.0])
        curve = y_mid - sag + sag * ((xx - centre) / (size / 2)) ** 2
        label[(np.abs(yy - curve) < thickness / 2) & (label != POLE)] = WIRE

    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0.05, 0.95) * size, rng.uniform(0.5, 0.95) * size
        label[np.hypot(xx - cx, yy - cy) < rng.uniform(3.0, 6.0)] = BALL

    for _ in range(rng.integers(0, 3)):  # clutter: unlabelled ("other")
        cx, cy = rng.uniform(0, size, size=2)
        label[np.hypot((xx - cx) / rng.uniform(1, 3), yy - cy) < rng.uniform(1.5, 3.5)] = 0

    palette = np.zeros((len(CLASS_NAMES) + 1, 3))
    palette[0] = rng.uniform(0.2, 0.8, size=3)
    for index, colour in CLASS_COLOURS.items():
        palette[index] = np.clip(np.asarray(colour) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 1)
    image = palette[label] + texture[..., None]
    sky = label == SKY  # a vertical gradient, as a real sky has
    image[sky] += ((yy[sky] / size) * 0.2)[:, None]
    image += rng.normal(0, NOISE, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


def ensure_synthetic_ade(root: str | Path, seed: int = 0, num_train: int = 256, num_val: int = 64,
                         image_size: int = 64, version: int = GENERATOR_VERSION) -> Path:
    """Write the embedded dataset under ``root`` unless the same one is already there; return ``root``.

    ``root`` is the folder that holds ``ADEChallengeData2016/`` (what ``data.root`` names for the real dataset).
    ``version`` (``data.embedded.version``, so that it is part of a run's config) must be the generator's own.
    """
    if version != GENERATOR_VERSION:
        raise ValueError(f"data.embedded.version={version!r}: this code writes version {GENERATOR_VERSION} of the "
                         "embedded scenes only (earlier versions are in the repository's history)")
    num_train, num_val = check_int("num_train", num_train, 1), check_int("num_val", num_val, 1)
    image_size = check_int("image_size", image_size, 16)
    spec = {"version": GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "classes": list(CLASS_NAMES)}

    def write(staging: Path) -> None:
        progress = Progress(num_train + num_val, f"writing the embedded ADE20k-layout dataset to {root}", True)
        written = 0
        for split, count in (("train", num_train), ("val", num_val)):
            folder, prefix = SPLITS[split]
            images = staging / ADE_FOLDER / "images" / folder
            annotations = staging / ADE_FOLDER / "annotations" / folder
            images.mkdir(parents=True)
            annotations.mkdir(parents=True)
            rng = np.random.default_rng([seed, 0 if split == "train" else 1])
            for index in range(1, count + 1):
                image, label = render_scene(image_size, rng)
                Image.fromarray(image).save(images / f"{prefix}_{index:08d}.jpg", quality=JPEG_QUALITY)
                Image.fromarray(label).save(annotations / f"{prefix}_{index:08d}.png")
                written += 1
                progress.update(written)

    return ensure_generated_folder(root, spec, write)
